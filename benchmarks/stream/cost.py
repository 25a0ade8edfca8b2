"""The cost section: time per call against rows per call, RCFG variants against full CFG, small and large model."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from straightflow.models import UNet
from straightflow.stream.pipeline import rows_per_call

from .report import fmt_value
from .throughput import bench_configs


def large_model(spec: Dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A randomly initialised UNet (``conv_out`` re-initialised so that velocities are not all zero)."""

    torch.manual_seed(seed)
    m = UNet(**spec)
    m.conv_out.reset_parameters()
    for q in m.parameters():
        q.requires_grad_(False)
    return m.eval()


def _cost_line(model, rows_list, reps: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Median wall and thread-CPU time of one model call on ``r`` rows for each ``r`` (sizes rotated between repeats)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(model.sample_shape)
    k = getattr(model, "num_classes", None)
    inputs = {}
    for r in rows_list:
        x = torch.randn((r, *shape), generator=g)
        t = torch.rand(r, generator=g)
        inputs[r] = (x, t, {"y": torch.randint(0, int(k) + 1, (r,), generator=g)} if k else {})
    wall: Dict[int, List[float]] = {r: [] for r in rows_list}
    cpu: Dict[int, List[float]] = {r: [] for r in rows_list}
    with torch.no_grad():
        for r in rows_list:  # warm-up
            for _ in range(2):
                x, t, c = inputs[r]
                model(x, t, **c)
        order = list(rows_list)
        for i in range(reps):
            for r in order[i % len(order):] + order[: i % len(order)]:
                x, t, c = inputs[r]
                tc, t0 = time.thread_time(), time.perf_counter()
                model(x, t, **c)
                wall[r].append(time.perf_counter() - t0)
                cpu[r].append(time.thread_time() - tc)
    out = []
    for r in rows_list:
        out.append({"rows": r, "ms": 1e3 * float(np.median(wall[r])), "ms_cpu": 1e3 * float(np.median(cpu[r])),
                    "ms_all": [1e3 * v for v in wall[r]], "ms_cpu_all": [1e3 * v for v in cpu[r]]})
    for d in out:
        d["relative_to_1row"] = d["ms"] / out[0]["ms"]
        d["relative_to_1row_cpu"] = d["ms_cpu"] / out[0]["ms_cpu"]
    return out


def _predicted_ratio(line: List[Dict[str, Any]], rcfg: str, n: int, key: str = "ms_cpu") -> Optional[float]:
    """``cost(2n) / cost(rows of rcfg)`` from the measured cost line (None when a size was not timed)."""

    ms = {d["rows"]: d[key] for d in line}
    a, b = ms.get(rows_per_call("full", n)), ms.get(rows_per_call(rcfg, n))
    return a / b if a and b else None


def cost_section(name: str, model, clip: torch.Tensor, label: Optional[int], ns, rows_list, repeats: int,
                  cost_reps: int, strength: float, guidance: float) -> Dict[str, Any]:
    torch.set_num_threads(1)
    params = sum(p.numel() for p in model.parameters())
    c, h, w = model.sample_shape
    print(f"[bench stream] cost: {name} model ({params} parameters, {c}x{h}x{w}): cost vs rows", flush=True)
    line = _cost_line(model, rows_list, cost_reps)
    res: Dict[str, Any] = {"model": name, "parameters": params, "shape": [c, h, w], "frames": len(clip),
                           "cost_reps": cost_reps, "cost_line": line, "rcfg": []}
    if label is None:
        res["note"] = "unconditional model: no RCFG"
        return res
    print(f"[bench stream] cost: {name} model: full CFG vs RCFG self / one-time at n = {list(ns)}", flush=True)
    cfgs = [{"mode": "stream", "n": n, "rcfg": r, "strength": strength, "guidance": guidance, "label": label,
             "filter": None} for n in ns for r in ("full", "self", "initialize")]
    rows = bench_configs(model, clip, cfgs, repeats, 1)

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a and b else None

    for r in rows:
        full = next(b for b in rows if b["n"] == r["n"] and b["rcfg"] == "full")
        r["x_full"] = r["fps"] / full["fps"]
        r["x_full_steady"] = ratio(r["fps_steady"], full["fps_steady"])
        r["x_full_steady_cpu"] = ratio(r["fps_steady_cpu"], full["fps_steady_cpu"])
        r["predicted_x_full"] = _predicted_ratio(line, r["rcfg"], r["n"], "ms_cpu")
        r["predicted_x_full_wall"] = _predicted_ratio(line, r["rcfg"], r["n"], "ms")
        r["model"] = name
    res["rcfg"] = rows
    return res


def cost_markdown(results: List[Dict[str, Any]], rows_list, repeats: int, guidance: float) -> List[str]:

    lo, hi = rows_list[-3], rows_list[-1]
    md = ["## RCFG where a call's cost grows with its rows (cost section, 1 thread)", "",
          "Full CFG runs `2n` rows per call, RCFG self `n`, one-time `n + 1` (the null row of the newest frame at "
          "its first stage), so at equal steps RCFG's speed-up over full CFG is the cost ratio of those calls: "
          "`cost(2n) / cost(n)` for self and `cost(2n) / cost(n + 1)` for one-time. Where a call's cost is "
          "proportional to its rows these are 2 and 2n / (n + 1) (1.0, 1.33, 1.6 at n = 1, 2, 4: one-time cannot "
          "reach 1.8x below n = 9 on any hardware); where a fixed per-call cost dominates (small tensors: ~20 "
          "convolutions on 8x8 maps cost mostly framework overhead) both stay near 1. The line below times one model "
          "call of r rows (median of " + ", ".join(f"{R['cost_reps']} ({R['model']})" for R in results)
          + " calls per size, sizes rotated), in wall time and in CPU time of "
          "the one compute thread (`time.thread_time`: it leaves out the time the process waits for a core, which "
          "on a shared machine is what makes wall-clock medians noisy).", "",
          "| model | parameters | shape | clock | " + " | ".join(f"{r} row{'s' if r > 1 else ''} (ms)" for r in rows_list)
          + f" | cost({hi}) / cost(1) | ms per extra row ({lo} → {hi}) |",
          "|" + "---|" * (len(rows_list) + 6)]
    for R in results:
        for key, clock in (("ms_cpu", "CPU"), ("ms", "wall")):
            ms = {d["rows"]: d[key] for d in R["cost_line"]}
            md.append(f"| {R['model']} | {R['parameters']:,} | {'x'.join(map(str, R['shape']))} | {clock} | "
                      + " | ".join(f"{ms[r]:.2f}" for r in rows_list)
                      + f" | {ms[hi] / ms[rows_list[0]]:.2f} | {(ms[hi] - ms[lo]) / (hi - lo):.2f} |")
    md += ["", f"Throughput (Stream Batch, guidance {guidance}, saturated, {repeats} timed repeat(s) in rotation). "
           "Whole-run fps (median run) counts the n - 1 warm-up and flush calls of fewer rows; steady-state fps is "
           "1 / the median time of a push that returns a frame (one call on the full batch), pooled over the "
           "repeats, in wall and in thread-CPU time; “predicted” is the CPU cost-line ratio above.", "",
           "| model | n | rcfg | rows / call (steady) | rows / frame | fps (whole run) | × full | fps steady (wall) | "
           "× full | fps steady (CPU) | × full | predicted × full | latency p50 (ms) |", "|" + "---|" * 13]
    for R in results:
        for r in R["rcfg"]:
            md.append(f"| {R['model']} | {r['n']} | {r['rcfg']} | {rows_per_call(r['rcfg'], r['n'])} | "
                      f"{r['rows_per_frame']:.2f} | {r['fps']:.1f} | {r['x_full']:.2f} | {fmt_value(r['fps_steady'])} | "
                      f"{fmt_value(r['x_full_steady'], 2)} | {fmt_value(r['fps_steady_cpu'])} | {fmt_value(r['x_full_steady_cpu'], 2)} | "
                      f"{fmt_value(r['predicted_x_full'], 2)} | {r['latency_ms_p50']:.1f} |")
    md.append("")
    for R in results:
        if not R["rcfg"]:
            md += [f"{R['model']}: {R.get('note', '')}", ""]
            continue
        ms = {d["rows"]: d["ms_cpu"] for d in R["cost_line"]}

        def fmt(mode: str, key: str) -> str:
            return ", ".join(f"{fmt_value(r[key], 2)}x (n={r['n']})" for r in R["rcfg"] if r["rcfg"] == mode)

        hit = [r["n"] for r in R["rcfg"] if r["rcfg"] == "self" and (r["x_full_steady_cpu"] or 0) >= 1.8]
        hit_wall = [r["n"] for r in R["rcfg"] if r["rcfg"] == "self" and (r["x_full_steady"] or 0) >= 1.8]
        md.append(f"- **{R['model']}**: a {hi}-row call costs {ms[hi] / ms[rows_list[0]]:.2f}x a 1-row call (CPU "
                  f"time); steady-state RCFG self / full CFG = {fmt('self', 'x_full_steady_cpu')} in CPU time, "
                  f"{fmt('self', 'x_full_steady')} in wall time; one-time / full CFG = "
                  f"{fmt('initialize', 'x_full_steady_cpu')} (CPU), {fmt('initialize', 'x_full_steady')} (wall). "
                  f"Self >= 1.8x: CPU time {'n = ' + ', '.join(map(str, hit)) if hit else 'none'}, wall time "
                  f"{'n = ' + ', '.join(map(str, hit_wall)) if hit_wall else 'none'}.")
    md.append("")
    return md


def plot_cost(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    rmax = 1
    for R in results:
        rs = [d["rows"] for d in R["cost_line"]]
        rmax = max(rmax, max(rs))
        ax.plot(rs, [d["relative_to_1row_cpu"] for d in R["cost_line"]], "o-", label=f"{R['model']} ({R['parameters']:,} params)")
    ax.plot([1, rmax], [1, rmax], "k--", lw=0.8, label="cost proportional to rows")
    ax.set_xlabel("rows in one call")
    ax.set_ylabel("call CPU time / 1-row call CPU time")
    ax.set_title("per-call cost vs rows (1 thread)")
    ax.legend(fontsize=8)
    ax = axes[1]
    bars = [(R["model"], r) for R in results for r in R["rcfg"] if r["rcfg"] != "full"]
    xs = range(len(bars))
    ax.bar(xs, [r["x_full_steady_cpu"] or 0 for _, r in bars],
           color=["#2a7" if r["rcfg"] == "self" else "#37c" for _, r in bars])
    ax.plot(xs, [r["x_full_steady"] or 0 for _, r in bars], "k_", ms=18, mew=2, label="wall time")
    ax.axhline(1.8, color="#c33", lw=1, ls="--", label="1.8x target")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{m}\nn={r['n']}\n{'self' if r['rcfg'] == 'self' else 'one-time'}" for m, r in bars], fontsize=7)
    ax.set_ylabel("steady-state fps / full-CFG fps (same n)")
    ax.set_title("RCFG vs full CFG, CPU time (green: self, blue: one-time)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


