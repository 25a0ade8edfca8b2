"""The streaming suite's tables, number format and plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List


def fmt_value(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def ratio_table(rows: List[Dict[str, Any]], base_key, base_label: str) -> str:
    head = ("| threads | mode | n | rcfg | filter | fps | × " + base_label + " | latency p50 (ms) | latency p99 (ms) | "
            "calls / generated frame | rows / generated frame | skipped |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        b = base_key(r)
        ratio = r["fps"] / b["fps"] if b else None
        lines.append(f"| {r['threads']} | {r['mode']} | {r['n']} | {r['rcfg']} | {fmt_value(r['filter'], 2)} | {r['fps']:.1f} | "
                     f"{fmt_value(ratio, 2)} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | "
                     f"{r['calls_per_frame']:.2f} | {r['rows_per_frame']:.2f} | {r['skipped']} |")
    return "\n".join(lines)


def plot_stream(rows: List[Dict[str, Any]], motion: Dict[str, Any], path: Path) -> None:
    """Left: Stream Batch throughput bars (when measured); right: motion-aware strength (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(rows)) + int(bool(motion))
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if rows:
        ax = axes.pop(0)
        r1 = [r for r in rows if r["threads"] == rows[0]["threads"] and r.get("filter") is None]
        labels = [f"{r['mode'][:3]} n={r['n']}\n{r['rcfg']}" for r in r1]
        ax.bar(range(len(r1)), [r["fps"] for r in r1], color=["#888" if r["mode"] == "sequential" else "#2a7" for r in r1])
        ax.set_xticks(range(len(r1)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("frames / s")
        ax.set_title(f"throughput ({rows[0]['threads']} thread(s)); grey = sequential")
    if motion:
        ax = axes.pop(0)
        ax.plot(motion["diff"], label="mean |frame difference|", color="#888")
        ax.plot(motion["strength"], label="motion-aware strength", color="#c33")
        ax.fill_between(range(len(motion["static"])), 0, 1, where=motion["static"], alpha=0.1, color="b", label="static stretch")
        ax.set_xlabel("frame")
        ax.legend(fontsize=8)
        ax.set_title("StreamDiffusionV2 motion-aware strength on the built-in clip")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


