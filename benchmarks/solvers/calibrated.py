"""The calibrated-solver sections of ``straightflow bench solvers`` (issue 13).

For every field and NFE 3-10 the benchmark calls the library API exactly as a user would,

    cal = straightflow.optimize.calibrate(model, kind, "auto", nfe, calib_noise, holdout=holdout_noise,
                                          cond=..., holdout_cond=..., guidance=..., rtol=..., save=False)
    straightflow.sample(model, eval_noise, solver=cal, cond=...)

with three disjoint noise batches: the calibration batch (seed + 1000), ``calibrate``'s own
held-out batch (seed + 1001; used only for its fallback decision) and the benchmark's evaluation
batch (seed, the batch every peer runs on). The RMSE reported is on the evaluation batch
against the benchmark's reference; the NFE is the one ``sample`` counted.

The float64 dopri5 reference of the calibration and held-out batches is computed once per field
(:func:`straightflow.optimize.learned.reference`) and handed to every ``calibrate`` call of that
field (the ``references=`` / ``model64=`` options, which ``calibrate`` passes to
:func:`~straightflow.optimize.learned.fit_learned`); each calibration extends it with the times it
needs and is charged for those calls. The cost table therefore shows, per kind and NFE, the CPU
seconds (``time.process_time`` around ``calibrate``) and model calls of that calibration, and,
once per field, the shared reference (the endpoints of both batches, which every calibration
needs); "standalone" adds the two: about what one calibration costs on its own (slightly less:
an extension time already added for an earlier NFE is not charged again).

Transfer (the ``learned`` kind at :data:`TRANSFER_NFES`): (a) the calibration applied to another
evaluation batch (another seed and size) next to the best peer of the main table and the
table's classical starting solver on that batch; (b) a calibration fitted on another
calibration batch (a quarter of the size, another seed) evaluated on the main evaluation batch;
(c) for a guided field, the table fitted at its guidance scale run at :data:`GUIDANCE_TRANSFER`
(``dataclasses.replace(cal.learned_solver, guidance=w)`` with
:func:`~straightflow.solvers.learned.sample_learned`; ``sample`` refuses that on purpose) next to
the classical start and the best peer at that scale.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from straightflow.optimize import calibrate
from straightflow.optimize.learned import reference as learned_reference
from straightflow.solvers import CountedVelocity, sample
from straightflow.solvers.guidance import ClassifierFreeGuidance
from straightflow.solvers.learned import LearnedSolver, sample_learned

__all__ = ["CAL_KINDS", "CAL_NFES", "cal_rtol", "calibration_section", "calibration_sizes", "transfer_section"]

CAL_KINDS = ("learned", "dc")
CAL_NFES = tuple(range(3, 11))
QUICK_CAL_NFES = (4, 8)
TRANSFER_NFES = (4, 8)
QUICK_TRANSFER_NFES = (4,)
GUIDANCE_TRANSFER = (1.5, 3.0)
GUIDANCE_TRANSFER_N = 64  # the first rows of the evaluation batch (each scale needs its own reference)
CAL_SEED_OFFSET = 1000
HOLDOUT_SEED_OFFSET = 1001
TRANSFER_SEED_OFFSET = 3  # the other evaluation batch
REFIT_SEED_OFFSET = 2000  # the other calibration batch

# (calibration batch, calibrate's held-out batch, other evaluation batch for the transfer)
_CAL_SIZES = {"oracle2d": (512, 512, 500), "oracle64d": (512, 256, 128), "checkerboard": (1024, 512, 500),
              "moons": (1024, 512, 500), "digits": (128, 64, 64), "digits-cfg": (128, 64, 64),
              "mnist": (32, 16, 16)}
_QUICK_CAL_SIZES = (96, 48, 48)


def calibration_sizes(name: str, quick: bool) -> tuple[int, int, int]:
    return _QUICK_CAL_SIZES if quick else _CAL_SIZES.get(name, (256, 128, 128))


def cal_rtol(fld, quick: bool) -> float:
    """Tolerance of the calibration's dopri5 reference: 1e-8 on the float64 oracle fields, 1e-6 on
    the trained float32 networks (their own float32 rounding is ~1e-7 per call), 1e-5 in quick mode."""
    if quick:
        return 1e-5
    return 1e-8 if fld.dtype == torch.float64 else 1e-6


def _rmse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _noise(shape, seed: int, dtype: torch.dtype) -> Tensor:
    from straightflow.solvers import initial_noise

    return initial_noise(tuple(shape), seed=seed, dtype=torch.float64)[0].to(dtype)


def _labels(fld, n: int) -> dict[str, Tensor] | None:
    nc = getattr(fld.raw, "num_classes", None) if fld.cond else None
    return {"y": torch.arange(n) % int(nc)} if nc else None


def _velocity64(fld, guidance: float | None):
    return fld.raw64 if guidance is None else ClassifierFreeGuidance(fld.raw64, float(guidance))


class CalibrationRun:
    """Shared state of one field's calibrations: batches, references, the fitted calibrations."""

    def __init__(self, fld, seed: int, quick: bool, rtol: float | None = None) -> None:
        self.fld = fld
        self.quick = quick
        self.seed = seed
        self.rtol = float(rtol) if rtol else cal_rtol(fld, quick)
        n_cal, n_hold, n_other = calibration_sizes(fld.name, quick)
        shape = tuple(fld.noise.shape[1:])
        self.calib = _noise((n_cal, *shape), seed + CAL_SEED_OFFSET, fld.dtype)
        self.holdout = _noise((n_hold, *shape), seed + HOLDOUT_SEED_OFFSET, fld.dtype)
        self.n_other = n_other
        self.calib_cond, self.holdout_cond = _labels(fld, n_cal), _labels(fld, n_hold)
        self.cals: dict[tuple[str, int], Any] = {}
        m64 = _velocity64(fld, fld.guidance)
        c0, t0 = time.process_time(), time.perf_counter()
        self.rc = learned_reference(m64, self.calib, cond=self.calib_cond, rtol=self.rtol)
        self.rh = learned_reference(m64, self.holdout, cond=self.holdout_cond, rtol=self.rtol)
        self.ref_cpu = time.process_time() - c0
        self.ref_wall = time.perf_counter() - t0
        self.ref_calls0 = self.rc.calls + self.rh.calls

    def calibrate(self, kind: str, nfe: int, calib: Tensor | None = None, refs=None,
                  calib_cond=None) -> tuple[Any, float]:
        """``calibrate(...)`` through the public API; returns (calibration, CPU seconds)."""
        fld = self.fld
        c0 = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cal = calibrate(fld.raw, kind, "auto", nfe, self.calib if calib is None else calib,
                            holdout=self.holdout, cond=self.calib_cond if calib is None else calib_cond,
                            holdout_cond=self.holdout_cond, guidance=fld.guidance, rtol=self.rtol, save=False,
                            references=refs or (self.rc, self.rh), model64=fld.raw64)
        return cal, time.process_time() - c0


def _cal_name(kind: str) -> str:
    return f"{kind} (calibrated, auto)"


def calibration_section(fld, nfes: Sequence[int], seed: int, quick: bool, failures: list[str], log,
                        rtol: float | None = None, kinds: Sequence[str] = CAL_KINDS) -> tuple[list[dict[str, Any]], dict[str, Any], CalibrationRun | None]:
    """Calibrate every kind at every NFE 3-10 of ``nfes`` and evaluate on the field's evaluation
    batch. Returns (result rows for the field table, the section's record, the run)."""
    want = [k for k in nfes if k in (QUICK_CAL_NFES if quick else CAL_NFES)]
    if not want or not kinds:
        return [], {}, None
    t0 = time.perf_counter()
    cr = CalibrationRun(fld, seed, quick, rtol)
    log(f"{fld.name}: calibration references (dopri5 rtol {cr.rtol:g}, n = {cr.calib.shape[0]} + "
        f"{cr.holdout.shape[0]}): {cr.ref_calls0} calls, {cr.ref_cpu:.1f} CPU s")
    rows, costs = [], []
    epc = fld.evals_per_call
    for kind in kinds:
        for nfe in want:
            calls_before = cr.rc.calls + cr.rh.calls
            try:
                cal, cpu = cr.calibrate(kind, nfe)
                with torch.no_grad():
                    t1 = time.perf_counter()
                    r = sample(fld.raw, fld.noise, solver=cal, cond=fld.cond)
                    secs = time.perf_counter() - t1
            except Exception as e:  # a kind that cannot run here is reported, not fatal
                failures.append(f"{kind} calibration at NFE {nfe}: {type(e).__name__}: {str(e)[:200]}")
                continue
            cr.cals[(kind, nfe)] = cal
            info = cal.info
            mc = dict(info.get("model_calls") or {})
            ext = cr.rc.calls + cr.rh.calls - calls_before  # reference extension charged to this calibration
            total_calls = int(sum(v for k, v in mc.items() if k != "reference")) + ext
            auto = (cal.table or {}).get("meta", {}).get("auto") or {}
            err = _rmse(r.x, fld.ref)
            if r.nfe != nfe * epc:
                failures.append(f"{kind} at NFE {nfe}: counted {r.nfe} NFE, skipped")
                continue
            rows.append({"method": _cal_name(kind), "library": "straightflow", "kind": "calibrated", "solver": "auto",
                         "grid": "learned", "nfe_target": nfe, "nfe": r.nfe // epc, "nfe_counted": r.nfe,
                         "rmse": err, "seconds": secs, "calibration_kind": kind,
                         "initial_solver": info.get("initial_solver"), "fallback": bool(info.get("fallback")),
                         "picked": auto.get("picked"), "n_params": info.get("n_params"),
                         "holdout_rmse": cal.holdout_rmse, "calib_rmse": cal.calib_rmse})
            costs.append({"kind": kind, "nfe": nfe, "cpu_seconds": cpu, "fit_cpu_seconds": info.get("cpu_seconds"),
                          "model_calls": total_calls, "reference_calls": ext, "calls_by_part": mc,
                          "initial_solver": info.get("initial_solver"), "fallback": bool(info.get("fallback")),
                          "picked": auto.get("picked")})
            log(f"{fld.name}: {kind} NFE {nfe}: RMSE {err:.3e} (start {info.get('initial_solver')}, "
                f"{'fallback' if info.get('fallback') else auto.get('picked', 'fitted')}), {cpu:.1f} CPU s, {total_calls} calls")
    rec = {"calib_n": int(cr.calib.shape[0]), "holdout_n": int(cr.holdout.shape[0]),
           "calib_seed": seed + CAL_SEED_OFFSET, "holdout_seed": seed + HOLDOUT_SEED_OFFSET, "rtol": cr.rtol,
           "reference": {"calls": cr.ref_calls0, "cpu_seconds": cr.ref_cpu, "wall_seconds": cr.ref_wall,
                         "calls_total": cr.rc.calls + cr.rh.calls},
           "costs": costs, "kinds": list(kinds), "nfes": want, "seconds": round(time.perf_counter() - t0, 1)}
    return rows, rec, cr


def best_peer_name(results: list[dict[str, Any]], nfe: int) -> str | None:
    c = [r for r in results if r["nfe_target"] == nfe and r["library"] != "straightflow"]
    return min(c, key=lambda r: r["rmse"])["method"] if c else None


def transfer_section(cr: CalibrationRun, results: list[dict[str, Any]], peers, nfes: Sequence[int], failures: list[str],
                     log) -> dict[str, Any]:
    """Transfer of the ``learned`` calibration: other evaluation batch, other calibration batch,
    other guidance scale (guided fields)."""
    fld = cr.fld
    want = [k for k in (QUICK_TRANSFER_NFES if cr.quick else TRANSFER_NFES) if ("learned", k) in cr.cals]
    out: dict[str, Any] = {"batch": [], "refit": [], "guidance": []}
    if not want:
        return out
    t0 = time.perf_counter()
    by_name = {p.name: p for p in peers}
    shape = tuple(fld.noise.shape[1:])
    m64 = _velocity64(fld, fld.guidance)

    def peer_rmse(name, nfe, model, x, cond, ref):
        p = by_name.get(name)
        if p is None:
            return None
        steps = p.steps_for(nfe)
        if steps is None:
            return None
        c = CountedVelocity(model, cond, check_finite=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = p.run(c, x.clone(), steps)
        return _rmse(y, ref)

    # (a) another evaluation batch: other seed and size
    seed_b = cr.seed + TRANSFER_SEED_OFFSET
    xb = _noise((cr.n_other, *shape), seed_b, fld.dtype)
    cb = _labels(fld, cr.n_other)
    try:
        with torch.no_grad():
            refb = sample(m64, xb.double(), solver="dopri5", steps=1, cond=cb, rtol=cr.rtol, atol=cr.rtol).x
        for nfe in want:
            cal = cr.cals[("learned", nfe)]
            with torch.no_grad():
                e_cal = _rmse(sample(fld.raw, xb, solver=cal, cond=cb).x, refb)
                init = LearnedSolver.from_dict(cal.info["initial_table"])
                e_init = _rmse(sample_learned(fld.raw, xb, init, cond=cb).x, refb)
            pn = best_peer_name(results, nfe)
            e_peer = peer_rmse(pn, nfe, fld.model, xb, cb, refb) if pn else None
            main = next((r for r in results if r["method"] == _cal_name("learned") and r["nfe_target"] == nfe), None)
            out["batch"].append({"nfe": nfe, "n": cr.n_other, "seed": seed_b, "rmse": e_cal, "init": cal.info.get("initial_solver"),
                                 "init_rmse": e_init, "peer": pn, "peer_rmse": e_peer,
                                 "main_rmse": main and main["rmse"], "main_n": int(fld.noise.shape[0])})
    except Exception as e:
        failures.append(f"transfer to another batch: {type(e).__name__}: {str(e)[:200]}")

    # (b) another calibration batch (a quarter of the size, another seed), evaluated on the main batch
    # (not on a guided field: its cost; the guidance-scale transfer is run there instead)
    n_small = max(16, cr.calib.shape[0] // 4)
    seed_c = cr.seed + REFIT_SEED_OFFSET
    xc = _noise((n_small, *shape), seed_c, fld.dtype)
    cc = _labels(fld, n_small)
    try:
        rc2 = learned_reference(m64, xc, cond=cc, rtol=cr.rtol) if fld.guidance is None else None
        for nfe in want if fld.guidance is None else ():
            cal2, cpu = cr.calibrate("learned", nfe, calib=xc, refs=(rc2, cr.rh), calib_cond=cc)
            with torch.no_grad():
                e2 = _rmse(sample(fld.raw, fld.noise, solver=cal2, cond=fld.cond).x, fld.ref)
            main = next((r for r in results if r["method"] == _cal_name("learned") and r["nfe_target"] == nfe), None)
            pn = best_peer_name(results, nfe)
            pe = next((r["rmse"] for r in results if r["method"] == pn and r["nfe_target"] == nfe), None)
            out["refit"].append({"nfe": nfe, "calib_n": n_small, "calib_seed": seed_c, "rmse": e2, "cpu_seconds": cpu,
                                 "fallback": bool(cal2.info.get("fallback")), "init": cal2.info.get("initial_solver"),
                                 "main_calib_n": int(cr.calib.shape[0]), "main_rmse": main and main["rmse"],
                                 "peer": pn, "peer_rmse": pe})
    except Exception as e:
        failures.append(f"transfer to another calibration batch: {type(e).__name__}: {str(e)[:200]}")

    # (c) another guidance scale (the API refuses it; run the table directly)
    if fld.guidance is not None:
        ng = min(int(fld.noise.shape[0]), GUIDANCE_TRANSFER_N)
        xg = fld.noise[:ng]
        cg = {k: v[:ng] for k, v in fld.cond.items()}
        for w in GUIDANCE_TRANSFER:
            try:
                mw64 = _velocity64(fld, w)
                with torch.no_grad():
                    refw = sample(mw64, xg.double(), solver="dopri5", steps=1, cond=cg, rtol=cr.rtol, atol=cr.rtol).x
                for nfe in want:
                    cal = cr.cals[("learned", nfe)]
                    tab = dataclasses.replace(cal.learned_solver, guidance=float(w))
                    init = dataclasses.replace(LearnedSolver.from_dict(cal.info["initial_table"]), guidance=float(w))
                    with torch.no_grad():
                        e_cal = _rmse(sample_learned(fld.raw, xg, tab, cond=cg).x, refw)
                        e_init = _rmse(sample_learned(fld.raw, xg, init, cond=cg).x, refw)
                    pn = best_peer_name(results, nfe)
                    e_peer = peer_rmse(pn, nfe, ClassifierFreeGuidance(fld.raw, float(w)), xg, cg, refw) if pn else None
                    out["guidance"].append({"nfe": nfe, "fitted_at": fld.guidance, "applied_at": w, "n": ng, "rmse": e_cal,
                                            "init": cal.info.get("initial_solver"), "init_rmse": e_init,
                                            "peer": pn, "peer_rmse": e_peer})
            except Exception as e:
                failures.append(f"guidance transfer to {w}: {type(e).__name__}: {str(e)[:200]}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"{fld.name}: transfer ({out['seconds']} s)")
    return out


# ============================================================================ Markdown
def _f(v) -> str:
    return "-" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.2e}"


def _r(a, b) -> str:
    if a is None or b is None or not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or b <= 0:
        return "-"
    return f"{a / b:.2f}"


def markdown_field(fname: str, fo: dict[str, Any]) -> list[str]:
    """The calibration, cost and transfer blocks of one field."""
    cal = fo.get("calibration_kinds") or {}
    if not cal:
        return []
    res = fo["results"]
    L = [f"Calibrated kinds (`straightflow.optimize.calibrate(model, kind, \"auto\", nfe, ...)`, sampled with "
         f"`straightflow.sample(model, noise, solver=cal)`): calibration batch n = {cal['calib_n']} (seed {cal['calib_seed']}), "
         f"`calibrate`'s held-out batch n = {cal['holdout_n']} (seed {cal['holdout_seed']}, used only for its fallback), "
         f"evaluated on this field's evaluation batch (n = {fo['n']}). Their reference: float64 dopri5 at rtol = atol = "
         f"{cal['rtol']:g}. Shared reference of the two batches: {cal['reference']['calls']} model calls, "
         f"{cal['reference']['cpu_seconds']:.1f} CPU s ({cal['reference']['calls_total']} calls with every extension).", "",
         "| kind | NFE | eval RMSE | best peer | ratio | start (classical) | picked | CPU s | model calls | CPU s standalone |",
         "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    costs = {(c["kind"], c["nfe"]): c for c in cal.get("costs", [])}
    for kind in cal.get("kinds", []):
        for nfe in cal.get("nfes", []):
            r = next((r for r in res if r.get("calibration_kind") == kind and r["nfe_target"] == nfe), None)
            c = costs.get((kind, nfe))
            if r is None or c is None:
                continue
            pn = best_peer_name(res, nfe)
            pe = next((q["rmse"] for q in res if q["method"] == pn and q["nfe_target"] == nfe), None)
            picked = "fallback" if r["fallback"] else (r.get("picked") or "fitted")
            L.append(f"| {kind} | {nfe} | {_f(r['rmse'])} | {_f(pe)} | {_r(r['rmse'], pe)} | {r.get('initial_solver')} | "
                     f"{picked} | {c['cpu_seconds']:.1f} | {c['model_calls']} | {c['cpu_seconds'] + cal['reference']['cpu_seconds']:.1f} |")
    tot = {k: sum(c["cpu_seconds"] for c in cal.get("costs", []) if c["kind"] == k) for k in cal.get("kinds", [])}
    L += ["", "CPU s: `time.process_time()` around `calibrate` (one thread), reference extension included; model calls: "
          "batch calls of this calibration (initial-solver selection, fit, checks, reference extension; a guided call "
          "computes 2 rows per sample); standalone = CPU s + the shared reference (about one calibration on its own; reference times already added for an "
          "earlier NFE are not charged again). All NFE together: "
          + ", ".join(f"{k} {v:.0f} CPU s" for k, v in tot.items())
          + f" + {cal['reference']['cpu_seconds']:.0f} CPU s shared reference.", ""]
    tr = fo.get("transfer") or {}
    if tr.get("batch") or tr.get("refit") or tr.get("guidance"):
        L += ["Transfer of the `learned` calibration:", ""]
    if tr.get("batch"):
        L += ["| NFE | evaluated on | RMSE | classical start (same batch) | best peer of the main table (same batch) | ratio to peer | RMSE on the main batch |",
              "|---:|---|---:|---:|---:|---:|---:|"]
        for b in tr["batch"]:
            L.append(f"| {b['nfe']} | n = {b['n']}, seed {b['seed']} | {_f(b['rmse'])} | {b['init']} {_f(b['init_rmse'])} | "
                     f"{b['peer']} {_f(b['peer_rmse'])} | {_r(b['rmse'], b['peer_rmse'])} | {_f(b['main_rmse'])} (n = {b['main_n']}) |")
        L.append("")
    if tr.get("refit"):
        L += ["| NFE | fitted on | RMSE (main batch) | fitted on the main calibration batch | best peer | ratio to peer | CPU s |",
              "|---:|---|---:|---:|---:|---:|---:|"]
        for b in tr["refit"]:
            fb = " (fallback)" if b["fallback"] else ""
            L.append(f"| {b['nfe']} | n = {b['calib_n']}, seed {b['calib_seed']} | {_f(b['rmse'])}{fb} | "
                     f"{_f(b['main_rmse'])} (n = {b['main_calib_n']}) | {b['peer']} {_f(b['peer_rmse'])} | "
                     f"{_r(b['rmse'], b['peer_rmse'])} | {b['cpu_seconds']:.1f} |")
        L.append("")
    if tr.get("guidance"):
        L += [f"Guidance scale (first {tr['guidance'][0].get('n', '')} rows of the evaluation batch): the table fitted at the field's scale run at another one "
              "(`dataclasses.replace(cal.learned_solver, guidance=w)`; `sample` refuses this). Reference at that scale: "
              f"dopri5 rtol {cal['rtol']:g}.", "",
              "| NFE | fitted at | applied at | RMSE | classical start at w | best peer at w | ratio to peer | ratio to start |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in tr["guidance"]:
            L.append(f"| {b['nfe']} | {b['fitted_at']:g} | {b['applied_at']:g} | {_f(b['rmse'])} | {b['init']} {_f(b['init_rmse'])} | "
                     f"{b['peer']} {_f(b['peer_rmse'])} | {_r(b['rmse'], b['peer_rmse'])} | {_r(b['rmse'], b['init_rmse'])} |")
        L.append("")
    return L
