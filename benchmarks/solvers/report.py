"""The solver suite's Markdown report, summaries against the peers and the issue's targets, and plots."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..harness import Report, Timing
from . import calibrated as scal
from .settings import QUALITY_NFE


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2e}"


def _ratio(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _ordered_methods(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in results:
        seen.setdefault(r["method"], r["library"])
    return list(seen.items())


def _best(results, nfe: int, pred) -> dict[str, Any] | None:
    c = [r for r in results if r["nfe_target"] == nfe and pred(r)]
    return min(c, key=lambda r: r["rmse"]) if c else None


def table_summary(fields_out: dict[str, Any], nfes: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for fname, fo in fields_out.items():
        res = fo["results"]
        for nfe in (k for k in nfes if 4 <= k <= 10):
            sf = _best(res, nfe, lambda r: r["library"] == "straightflow")
            sf_fixed = _best(res, nfe, lambda r: r["library"] == "straightflow" and r["kind"] == "fixed grid")
            peer = _best(res, nfe, lambda r: r["library"] != "straightflow")
            rows.append({"field": fname, "nfe": nfe,
                         "sf": sf and {"method": sf["method"], "rmse": sf["rmse"], "nfe": sf["nfe"]},
                         "sf_fixed": sf_fixed and {"method": sf_fixed["method"], "rmse": sf_fixed["rmse"]},
                         "peer": peer and {"method": peer["method"], "rmse": peer["rmse"]},
                         "ratio": (peer["rmse"] / sf["rmse"]) if (sf and peer and sf["rmse"] > 0) else None,
                         "ratio_fixed": (peer["rmse"] / sf_fixed["rmse"]) if (sf_fixed and peer and sf_fixed["rmse"] > 0) else None})
    return rows


TARGET_CAL = 1.0 / 3.0  # issue 13: best calibrated <= 1/3 of the best peer's RMSE at NFE 4-10
TARGET_DEFAULT = 0.8  # issue 13: uncalibrated default <= 0.8x the best peer
DEFAULT_SOLVER = "euler"  # straightflow.sample's default solver


def calibrated_summary_data(fields_out: dict[str, Any], nfes: Sequence[int]) -> dict[str, Any]:
    """Field x NFE 3-10: best calibrated / best peer, best uncalibrated / best peer, default / best peer
    (RMSE ratios on the evaluation batch; below 1: straightflow more accurate), and per fixed solver
    its worst ratio over every field at NFE 4-10 (the candidates for an uncalibrated default)."""
    rows = []
    worst: dict[str, float] = {}
    seen: dict[str, int] = {}
    cells = 0
    for fname, fo in fields_out.items():
        res = fo["results"]
        for nfe in (k for k in nfes if 3 <= k <= 10):
            peer = _best(res, nfe, lambda r: r["library"] != "straightflow")
            cal = _best(res, nfe, lambda r: r["kind"] == "calibrated")
            fixed = _best(res, nfe, lambda r: r["library"] == "straightflow" and r["kind"] == "fixed grid")
            default = _best(res, nfe, lambda r: r["method"] == f"{DEFAULT_SOLVER} / uniform")
            pr = peer["rmse"] if peer and peer["rmse"] > 0 else None

            def q(r):
                return None if (r is None or pr is None) else r["rmse"] / pr

            rows.append({"field": fname, "nfe": nfe, "peer": peer and {"method": peer["method"], "rmse": peer["rmse"]},
                         "cal": cal and {"method": cal["method"], "rmse": cal["rmse"], "nfe": cal["nfe"],
                                         "initial_solver": cal.get("initial_solver"), "fallback": cal.get("fallback")},
                         "fixed": fixed and {"method": fixed["method"], "rmse": fixed["rmse"]},
                         "default": default and {"method": default["method"], "rmse": default["rmse"]},
                         "cal_ratio": q(cal), "fixed_ratio": q(fixed), "default_ratio": q(default)})
            if 4 <= nfe <= 10 and pr is not None:
                cells += 1
                for r in res:
                    if r["nfe_target"] == nfe and r["kind"] == "fixed grid" and r["grid"] == "uniform":
                        worst[r["solver"]] = max(worst.get(r["solver"], 0.0), r["rmse"] / pr)
                        seen[r["solver"]] = seen.get(r["solver"], 0) + 1
    single = sorted((w, s_) for s_, w in worst.items() if seen[s_] == cells)
    return {"rows": rows, "single_solver_worst": [{"solver": s_, "worst_ratio": w} for w, s_ in single],
            "target_cal": TARGET_CAL, "target_default": TARGET_DEFAULT, "default_solver": DEFAULT_SOLVER}


def _quality(fo: dict[str, Any]) -> str:
    """One line: the best calibrated at NFE 4 against a good fixed solver at NFE 100 (distribution metric)."""
    ms = fo.get("metrics") or []
    c4 = min((m for m in ms if m.get("kind") == "calibrated" and m["nfe_target"] == 4), key=lambda m: m["value"], default=None)
    hi = next((m for m in ms if m["nfe_target"] == QUALITY_NFE), None)
    if c4 is None or hi is None:
        return ""
    p4 = min((m for m in ms if m["library"] != "straightflow" and m["nfe_target"] == 4), key=lambda m: m["value"], default=None)
    txt = (f"Quality: {c4['metric']} of the best calibrated at NFE 4 ({c4['method']}) {c4['value']:.4g} vs "
           f"{hi['method']} at NFE {hi['nfe']} {hi['value']:.4g}: {c4['value'] / hi['value']:.2f}x (target for FD: "
           f"<= 1.2x); data floor {hi['floor']:.4g}")
    if p4 is not None:
        txt += f"; best peer at NFE 4 ({p4['method']}) {p4['value']:.4g} ({p4['value'] / hi['value']:.2f}x)"
    return txt + "."


def _cal_summary_markdown(cs: dict[str, Any]) -> list[str]:
    rows = cs["rows"]
    if not rows or not any(r["cal"] for r in rows):
        return []
    fields = list(dict.fromkeys(r["field"] for r in rows))
    nfes = sorted({r["nfe"] for r in rows})
    by = {(r["field"], r["nfe"]): r for r in rows}

    def cell(r, key, target, _=True):
        v = r[key] if r else None
        if v is None:
            return "-"
        if not 4 <= r["nfe"] <= 10:
            return f"{v:.2f}"
        return f"**{v:.2f}**" if v <= target else f"{v:.2f} ✗"

    L = ["## Summary: calibrated and uncalibrated straightflow / best peer, NFE 3-10 (issue 13)", "",
         "Ratio = straightflow RMSE / best peer RMSE on the evaluation batch (below 1: straightflow more accurate; the "
         "inverse of the ratio in the table above). Calibrated = the better of the `learned` and `dc` kinds "
         "(`calibrate(..., solver=\"auto\")`), fitted on other noise. Targets at NFE 4-10: calibrated <= 1/3 (0.33), "
         "uncalibrated default <= 0.8; **bold** = met, ✗ = missed (NFE 3 has no target).", "",
         "Best calibrated / best peer:", "",
         "| field x NFE | " + " | ".join(str(k) for k in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for f in fields:
        L.append(f"| {f} | " + " | ".join(cell(by.get((f, k)), "cal_ratio", TARGET_CAL, True) for k in nfes) + " |")
    L += ["", "Best uncalibrated straightflow solver (any named grid, chosen on the evaluation batch: optimistic) / best peer:", "",
          "| field x NFE | " + " | ".join(str(k) for k in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for f in fields:
        L.append(f"| {f} | " + " | ".join(cell(by.get((f, k)), "fixed_ratio", TARGET_DEFAULT, True) for k in nfes) + " |")
    L += ["", f"`straightflow.sample`'s default solver (`{cs['default_solver']}`, uniform grid) / best peer:", "",
          "| field x NFE | " + " | ".join(str(k) for k in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for f in fields:
        L.append(f"| {f} | " + " | ".join(cell(by.get((f, k)), "default_ratio", TARGET_DEFAULT, True) for k in nfes) + " |")
    miss = [r for r in rows if 4 <= r["nfe"] <= 10 and r["cal_ratio"] is not None and r["cal_ratio"] > TARGET_CAL]
    met = [r for r in rows if 4 <= r["nfe"] <= 10 and r["cal_ratio"] is not None and r["cal_ratio"] <= TARGET_CAL]
    L += ["", f"Calibrated target (<= 0.33 at NFE 4-10): met in {len(met)} of {len(met) + len(miss)} cells."]
    if miss:
        L.append("Missed: " + "; ".join(f"{r['field']} NFE {r['nfe']} {r['cal_ratio']:.2f} ({r['cal_ratio'] / TARGET_CAL:.2f}x the target)"
                                        for r in miss) + ".")
    sw = cs.get("single_solver_worst") or []
    if sw:
        L += ["", "Uncalibrated default target (<= 0.8 at NFE 4-10 on every field): worst ratio of each single fixed "
              "solver on the uniform grid over every field and NFE 4-10 (the best candidates for a default):", "",
              "| solver | worst ratio | vs target |", "|---|---:|---:|"]
        L += [f"| {d['solver']} | {d['worst_ratio']:.2f} | {d['worst_ratio'] / TARGET_DEFAULT:.2f}x |" for d in sw[:6]]
    L.append("")
    return L


def _best_curves(results) -> tuple[str | None, str | None]:
    """Best straightflow and best peer method over NFE 4-10: the lowest mean of
    log10(RMSE / best RMSE of any method at that NFE) over the NFE the method reaches (>= 2 of them)."""
    span = [r for r in results if 4 <= r["nfe_target"] <= 10]
    floor: dict[int, float] = {}
    for r in span:
        floor[r["nfe_target"]] = min(floor.get(r["nfe_target"], math.inf), r["rmse"])

    def score(lib_sf: bool) -> str | None:
        by: dict[str, list[float]] = {}
        for r in span:
            if (r["library"] == "straightflow") == lib_sf and r["rmse"] > 0:
                by.setdefault(r["method"], []).append(math.log10(r["rmse"] / max(floor[r["nfe_target"]], 1e-300)))
        cand = {k: v for k, v in by.items() if len(v) >= 2} or by
        return min(cand, key=lambda k: sum(cand[k]) / len(cand[k])) if cand else None

    return score(True), score(False)


def plot_field(path: Path, fname: str, fo: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = fo["results"]
    best_sf, best_peer = _best_curves([r for r in res if r["kind"] != "calibrated"])
    best_cal, _ = _best_curves([r for r in res if r["kind"] == "calibrated"])
    fig = Figure(figsize=(7.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for name, lib in _ordered_methods(res):
        pts = sorted((r["nfe"], r["rmse"]) for r in res if r["method"] == name)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if name in (best_sf, best_peer, best_cal):
            continue
        color = "#3a78c2" if lib == "straightflow" else "#d9822b"
        ax.plot(xs, ys, color=color, lw=0.7, alpha=0.35, marker=".", ms=2)
    for name, color, label in ((best_cal, "#1e8449", "best calibrated"), (best_sf, "#0b3d91", "best straightflow, uncalibrated"),
                               (best_peer, "#c0392b", "best peer")):
        if name is None:
            continue
        pts = sorted((r["nfe"], r["rmse"]) for r in res if r["method"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=2.4, marker="o", ms=4,
                label=f"{label}: {name}")
    ax.plot([], [], color="#3a78c2", lw=0.8, alpha=0.6, label="other straightflow solver/grid")
    ax.plot([], [], color="#d9822b", lw=0.8, alpha=0.6, label="other peer methods")
    ax.set_xscale("log")
    ax.set_yscale("log")
    nf = sorted({r["nfe"] for r in res})
    if nf:
        ax.set_xticks(nf, labels=[str(v) for v in nf])
        ax.minorticks_off()
    ax.set_xlabel("NFE (counted velocity evaluations)")
    ax.set_ylabel("endpoint RMSE to the reference")
    ax.set_title(f"{fname}: {fo['title']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_summary(path: Path, cs: dict[str, Any]) -> bool:
    """Ratio to the best peer against NFE, per field: best calibrated (solid) and best uncalibrated (dashed),
    with the targets 1/3 and 0.8."""
    rows = [r for r in cs.get("rows", []) if r.get("cal_ratio") is not None or r.get("fixed_ratio") is not None]
    if not rows:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for k, f in enumerate(dict.fromkeys(r["field"] for r in rows)):
        c = colors[k % len(colors)]
        pts = sorted((r["nfe"], r["cal_ratio"]) for r in rows if r["field"] == f and r["cal_ratio"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker="o", ms=4, lw=1.8, label=f"{f}: calibrated")
        pts = sorted((r["nfe"], r["fixed_ratio"]) for r in rows if r["field"] == f and r["fixed_ratio"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, ls="--", lw=1.0, alpha=0.7, label=f"{f}: uncalibrated")
    ax.axhline(TARGET_CAL, color="k", lw=1.2, ls=":", label="target 1/3 (calibrated)")
    ax.axhline(TARGET_DEFAULT, color="grey", lw=1.0, ls="-.", label="target 0.8 (uncalibrated default)")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (guided evaluations for a guided field)")
    ax.set_ylabel("straightflow RMSE / best peer RMSE")
    ax.set_title("best calibrated and best uncalibrated straightflow vs the best peer", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown_report(meta: dict[str, Any], fields_out: dict[str, Any], summary, overhead, nfes, cal_summary=None) -> str:
    repeats = (overhead or {}).get("repeats", 0)
    report = Report("Solver accuracy at equal NFE: straightflow vs peers", meta["command"],
                    Timing(meta["threads"], warmup=1, repeats=repeats,
                           note="Only the overhead section is timed (contenders interleaved, one process); the "
                                "accuracy tables count velocity evaluations." if repeats else
                                "The accuracy tables count velocity evaluations."),
                    quick=meta["quick"], date=meta["date"], machine=meta["machine"],
                    machine_note=f"{meta['cpus']} logical CPUs.{meta['load']}")
    L: list[str] = [
          "Peers: " + ", ".join(f"{k} {v}" for k, v in meta["peer_versions"].items()) + "."]
    for lib, why in meta["peers_skipped"].items():
        L.append(f"- **{lib} skipped**: {why}")
    for name, note in meta.get("peer_notes", {}).items():
        L.append(f"- {name}: {note}")
    for note in meta["notes"]:
        L.append(f"- {note}")
    for fname, why in (meta.get("fields_skipped") or {}).items():
        L.append(f"- **field {fname} skipped**: {why}")
    L += ["", "Metric: endpoint RMSE (all elements) to a fine reference solve of the same field from the same noise. "
          "NFE = velocity evaluations per sample, counted by a wrapper for every method; a method appears in "
          "an NFE column only when its counted NFE equals it (`-`: that NFE is not reachable exactly, e.g. a "
          "2-evaluation step at an odd NFE). Searched schedules may use fewer NFE than the column (shown in "
          "brackets). BOSS grids and searched schedules are calibrated on a separate noise batch.", ""]

    L += ["## Summary: best straightflow vs best peer, NFE 4-10", "",
          "Ratio = best peer RMSE / best straightflow RMSE (> 1: straightflow more accurate). "
          "\"fixed grid\" = best straightflow solver on a named grid (no calibration).", "",
          "| field | NFE | best straightflow | RMSE | best straightflow, fixed grid | RMSE | best peer | RMSE | ratio | ratio (fixed grid) |",
          "|---|---:|---|---:|---|---:|---|---:|---:|---:|"]
    for s in summary:
        sf, sff, pe = s["sf"] or {}, s["sf_fixed"] or {}, s["peer"] or {}
        L.append(f"| {s['field']} | {s['nfe']} | {sf.get('method', '-')} | {_fmt(sf.get('rmse'))} | "
                 f"{sff.get('method', '-')} | {_fmt(sff.get('rmse'))} | {pe.get('method', '-')} | {_fmt(pe.get('rmse'))} | "
                 f"{_ratio(s['ratio'])} | {_ratio(s['ratio_fixed'])} |")
    L.append("")
    if cal_summary:
        L += _cal_summary_markdown(cal_summary)
        if meta.get("summary_plot"):
            L += ["![ratio to the best peer](solvers-summary.png)", ""]

    for fname, fo in fields_out.items():
        L += [f"## {fname}: {fo['title']}", "",
              f"Source: {fo['source']}. Evaluation batch n = {fo['n']}. Reference: {fo['reference']}. "
              f"Calibration (BOSS, search): n = {fo['calibration']['n']}, {fo['calibration']['reference']}, "
              f"{fo['calibration']['seconds']} s; search over {{{', '.join(fo['calibration']['search_candidates'])}}} "
              f"on the uniform and Euler-BOSS grids up to NFE {fo['calibration']['search_max_nfe']}. Field total {fo['seconds']} s.", ""]
        gp = fo["grid_probe"]
        kept = {s: [g for g, e in errs.items() if g != "uniform" and math.isfinite(e) and e < errs.get("uniform", math.inf)]
                for s, errs in gp["rmse"].items()}
        kept_txt = "; ".join(f"{s}: {', '.join(g)}" for s, g in kept.items() if g) or "none"
        L += [f"Named grids other than uniform are kept where they beat uniform at NFE {gp['nfe']} on the calibration batch: {kept_txt}.", ""]
        if fo.get("evals_per_call", 1) > 1:
            L += [f"Guided field (classifier-free guidance {fo.get('guidance'):g}): every method samples the same guided "
                  f"velocity; a column is the number of guided evaluations, each counted as {fo['evals_per_call']} NFE "
                  f"(one batched call of conditional + unconditional rows), for every method alike. The searched "
                  "schedule (its budget counts calls) and the BOSS grids (cost) are not run on this field.", ""]
        if fo["skipped_solvers"]:
            L += ["Not in the fixed-NFE table: " + ", ".join(f"{k} ({v})" for k, v in fo["skipped_solvers"].items()) + ".", ""]
        cols = list(nfes)
        L += ["| method | library | " + " | ".join(str(c) for c in cols) + " |",
              "|---|---|" + "---:|" * len(cols)]
        res = fo["results"]
        for name, lib in _ordered_methods(res):
            cells = []
            for c in cols:
                r = next((r for r in res if r["method"] == name and r["nfe_target"] == c), None)
                if r is None:
                    cells.append("-")
                else:
                    cells.append(_fmt(r["rmse"]) + (f" ({r['nfe']})" if r["nfe"] != c else ""))
            L.append(f"| {name} | {lib} | " + " | ".join(cells) + " |")
        L += ["", f"![{fname}](solvers-{fname}.png)", ""]
        L += scal.markdown_field(fname, fo)
        if fo["adaptive"]:
            L += ["Adaptive solvers (tolerance-controlled; NFE counted):", "", "| method | rtol = atol | NFE | RMSE |",
                  "|---|---:|---:|---:|"]
            L += [f"| {a['method']} | {a['tol']:g} | {a['nfe']} | {_fmt(a['rmse'])} |" for a in fo["adaptive"]]
            L.append("")
        if fo["diffusers_check"]:
            steps = sorted({int(k) for row in fo["diffusers_check"] for k in row["rmse"]})
            L += ["diffusers multistep schedulers, convergence on this oracle (RMSE by step count = NFE):", "",
                  "| scheduler | sigmas | used in the tables | " + " | ".join(str(s) for s in steps) + " |",
                  "|---|---|---|" + "---:|" * len(steps)]
            for row in fo["diffusers_check"]:
                L.append(f"| {row['method']} | {row['variant']} | {'yes' if row['used'] else 'no'} | "
                         + " | ".join(_fmt(row["rmse"].get(s, row["rmse"].get(str(s)))) for s in steps) + " |")
            L.append("")
        if fo.get("metrics"):
            L += [f"Distribution metric (n = {fo['metrics'][0]['n']} samples, fresh noise; best {meta['metric_top']} of each side by RMSE):", "",
                  "| NFE | method | library | metric | value | data-vs-data floor | ratio |", "|---:|---|---|---|---:|---:|---:|"]
            L += [f"| {m['nfe']} | {m['method']} | {m['library']} | {m['metric']} | {m['value']:.4g} | {m['floor']:.4g} | {m['ratio']:.2f}x |"
                  for m in fo["metrics"]]
            L.append("")
            q = _quality(fo)
            if q:
                L += [q, ""]
        if fo["failures"]:
            L += ["Skipped or failed combinations:", ""] + [f"- {f}" for f in fo["failures"][:30]]
            if len(fo["failures"]) > 30:
                L.append(f"- ... {len(fo['failures']) - 30} more in solvers.json")
            L.append("")

    if overhead:
        L += ["## Overhead per velocity call (trivial field v = -x)", "",
              f"Batch {overhead['batch'][0]} x {overhead['batch'][1]} {overhead['dtype']}, {overhead['steps']} steps per run, "
              f"median over {overhead['repeats']} repeats after a warm-up run, contenders interleaved (order rotated), "
              "one process. Time per run / counted velocity calls (= per step for 1-NFE steps; = per `step()` "
              "call for the diffusers schedulers), the trivial velocity included. *Own cost* subtracts the "
              "median time of the velocity call alone (measured in the same run): what the sampler itself adds "
              "per step. straightflow checks for NaN/Inf once on the final state (and replays a failed solve "
              "with per-call checks to name the step), so its loop carries no per-call check.", "",
              "| contender | us per call (median) | IQR | own cost (us) | counterpart | ratio to counterpart | own-cost ratio |",
              "|---|---:|---:|---:|---|---:|---:|"]
        for r in overhead["rows"]:
            rp = "-" if r["ratio_to_partner"] is None else f"{r['ratio_to_partner']:.2f}"
            ro = "-" if r.get("own_ratio_to_partner") is None else f"{r['own_ratio_to_partner']:.2f}"
            L.append(f"| {r['contender']} | {r['us_per_call']:.1f} | {r['iqr']:.1f} | {r.get('own_us', float('nan')):.1f} | "
                     f"{r['partner'] or '-'} | {rp} | {ro} |")
        L.append("")
    L.append(f"Total time {meta['seconds']:.0f} s.")
    return report.add(*L).render()

