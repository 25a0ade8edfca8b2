"""``straightflow calibrate RUN --nfe 6``: fit a solver to a trained run and store it beside the run.

``straightflow sample RUN --calibrated`` then samples with the stored calibration (see
:func:`pick_calibration`). Every calibration kind of ``straightflow.optimize.calibration_kinds()``
is offered; the default, ``learned``, fits a non-stationary multistep table to an accurate
reference of this model and keeps it only if it beats its classical start on held-out noise.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..optimize import (CALIBRATION_KINDS, DEFAULT_BUDGET_S, Calibration, CalibrationMismatch, calibrate, calibration_kinds,
                        calibration_path, model_fingerprint, stored_calibrations)
from ..solvers import initial_noise
from ..system import machine_line
from ..train import max_steps_cap
from . import flags


def cmd_calibrate(a: argparse.Namespace) -> int:
    dev = flags.device(a)
    model, info = flags.load_run(a.run, device=dev)
    kind = CALIBRATION_KINDS.get(a.kind).name
    if info.average_velocity:
        raise ValueError(f"{a.run} is an average-velocity ({info.objective}) run: its sampler takes no calibration")
    self_sized = kind in ("learned", "dc") and a.batch is None
    if a.budget is not None and not self_sized:
        raise ValueError("--budget sizes the batches of a learned/dc calibration: drop --batch (or --budget)")
    if a.budget is not None and not a.budget > 0:
        raise ValueError(f"--budget must be > 0 CPU seconds, got {a.budget:g}")
    if a.rtol is not None and not 0 < a.rtol < 1:
        raise ValueError(f"--rtol must be in (0, 1), got {a.rtol:g}")
    budget = a.budget if a.budget is not None else DEFAULT_BUDGET_S
    batch = a.batch or 256
    if max_steps_cap() is not None:  # smoke tests (the README test): a small, cheap calibration
        self_sized, batch, a.mode = False, min(batch, 32), a.mode or "ls"
        a.rtol = max(a.rtol or 1e-4, 1e-4)
    k = getattr(model, "num_classes", None)
    if a.guidance is not None and not k:
        raise ValueError("--guidance needs a class-conditional model")
    labels = (lambda n, _k=int(k): {"y": (torch.arange(n) % _k).to(dev)}) if k else None
    options = {}
    if kind in ("learned", "dc"):
        if a.rtol is not None:
            options["rtol"] = a.rtol
        if a.mode and kind == "learned":
            options["mode"] = a.mode
    if self_sized:
        noise, extra = (1, *info.shape), {"cond": labels, "budget_s": budget, "progress": not a.quiet}
        what = f"batches sized within {budget:g} CPU s"
    else:
        # noise of its own (seeds 1000 + seed, 1001 + seed): never the noise `sample --seed` draws
        noise, _ = initial_noise((batch, *info.shape), seed=a.seed + 1000, device=dev)
        xh, _ = initial_noise((batch, *info.shape), seed=a.seed + 1001, device=dev)
        cond = None if labels is None else labels(batch)
        extra = {"holdout": xh, "cond": cond, "holdout_cond": cond}
        what = f"{batch} calibration + {batch} held-out samples"
    if not a.quiet:
        print(f"calibrating {a.run}: {kind} ({a.solver}) at NFE {a.nfe}, {what}"
              f"{'' if a.guidance is None else f', guidance {a.guidance:g}'}; the reference solve "
              "(float64 dopri5) takes most of the time", flush=True)
    t0 = time.process_time()
    cal = calibrate(model, kind, a.solver, a.nfe, noise, run_dir=a.run, guidance=a.guidance, recompute=a.recompute,
                    path=info.path, seed=a.seed, **extra, **options)
    cpu = time.process_time() - t0
    print(describe(cal, a.run, cpu))
    return 0


def describe(cal: Calibration, run, cpu: Optional[float] = None) -> str:
    """A short Markdown report of a calibration: its start, its held-out error, its cost and its file."""
    p = calibration_path(run, cal.kind, cal.solver, cal.budget_nfe, cal.guidance)
    lines = [f"# {cal.describe()}", "", f"file: `{p}` (created {cal.created})", ""]
    info = cal.info
    if cal.table is not None:
        h = info.get("holdout_rmse", {})
        init = info.get("initial_solver")
        lines += ["| | held-out RMSE to the reference |", "|---|---:|",
                  f"| {init} (classical start, uniform grid) | {h.get('init', float('nan')):.3e} |",
                  f"| calibrated ({info.get('mode')}) | {h.get('fitted', float('nan')):.3e} |", ""]
        st = info.get("holdout_stats")
        if st:
            lines += [f"Held-out RMSE of the calibration: {st['rmse']:.3e}, {st['level']:.0%} interval for a fresh batch "
                      f"of {st['n']}: [{st['lo']:.3e}, {st['hi']:.3e}]; 99th percentile of the per-sample error "
                      f"{st['p99']:.3e}.", ""]
        sz = info.get("sizing") or {}
        if sz.get("self_sized"):
            lines += [f"Self-sized: {sz['batch']} calibration + {sz['batch']} held-out samples, mode {sz['mode_used']}, "
                      f"within a budget of {sz['budget_s']:g} CPU s ({len(sz['history'])} fits).", ""]
        if info.get("fallback"):
            lines.append(f"The fitted table was not better on held-out noise (bootstrap probability "
                         f"{info.get('p_better', 0):.2f} < 0.9): the calibration is {init} itself.")
        else:
            lines.append(f"{h['init'] / h['fitted']:.2f}x lower error than {init} at the same NFE "
                         f"({info.get('n_params')} parameters).")
        calls = sum(int(v) for v in (info.get("model_calls") or {}).values())
        lines.append(f"Fit: {info.get('cpu_seconds', float('nan')):.1f} CPU s, {calls} batch model calls "
                     "(reference included).")
    else:
        lines.append(f"Calibration RMSE {cal.calib_rmse:.3e}, held-out RMSE {cal.holdout_rmse:.3e}; solvers per step: "
                     f"{', '.join(cal.solvers)}.")
    if cpu is not None:
        lines.append(f"This command: {cpu:.1f} CPU s ({'computed' if cpu > 1.0 else 'reused the stored file'}); "
                     f"{machine_line()}.")
    lines += ["", f"Sample with it: `straightflow sample {run} --calibrated --nfe {cal.budget_nfe}`"
              + ("" if cal.guidance is None else f" --guidance {cal.guidance:g}")]
    return "\n".join(lines)


def pick_calibration(run, nfe: Optional[int], guidance: Optional[float], kind: Optional[str] = None,
                     shape: Optional[Sequence[int]] = None, verify: bool = False) -> Calibration:
    """The stored calibration of ``run`` for this NFE (any, when only one NFE is stored), guidance
    scale and kind; the lowest held-out RMSE when several match. Clear errors otherwise.

    ``verify=True`` (and ``shape``, the sample shape) also drops files computed for other weights (the
    fingerprint of ``run/model.safetensors``) or another shape; when only such stale files are left the
    error says which and why (``sample --calibrated`` refuses them; ``sample --nfe`` ignores them,
    :func:`valid_calibration`)."""
    cals = [c for c in stored_calibrations(run)
            if (kind is None or c.kind == kind) and (c.guidance == (None if guidance is None else float(guidance)))]
    hint = f"`straightflow calibrate {run} --nfe {nfe or 6}" + ("" if guidance is None else f" --guidance {guidance:g}") + "`"
    if not cals:
        raise FileNotFoundError(f"{Path(run) / 'calibrations'} holds no calibration"
                                f"{'' if guidance is None else f' at guidance {guidance:g}'}: run {hint} first")
    if nfe is None:
        nfes = sorted({c.budget_nfe for c in cals})
        if len(nfes) > 1:
            raise ValueError(f"{run} has calibrations at NFE {', '.join(map(str, nfes))}: choose one with --nfe")
        nfe = nfes[0]
    at: List[Calibration] = [c for c in cals if c.budget_nfe == nfe]
    if not at:
        raise FileNotFoundError(f"{run} has no calibration at NFE {nfe} (stored: NFE "
                                f"{', '.join(str(c.budget_nfe) for c in cals)}): run {hint}")
    if verify:
        valid, stale = _split_valid(run, at, shape)
        if not valid:
            c, why = stale[0]
            raise CalibrationMismatch(f"{calibration_file(run, c)} is stale ({why}): run {hint} --recompute")
        at = valid
    return min(at, key=lambda c: c.holdout_rmse if c.holdout_rmse is not None else float("inf"))


def calibration_file(run, cal: Calibration) -> Path:
    """The file ``cal`` is stored in beside ``run``."""
    return calibration_path(run, cal.kind, cal.solver, cal.budget_nfe, cal.guidance)


def _split_valid(run, cals: Sequence[Calibration], shape: Optional[Sequence[int]]):
    """``(valid, [(stale, why), ...])``: valid means the run's current weights and this sample shape."""
    fp = model_fingerprint(run)
    valid, stale = [], []
    for c in cals:
        if c.fingerprint != fp:
            stale.append((c, "computed for other weights: the run was retrained or changed since"))
        elif shape is not None and c.shape is not None and list(c.shape) != list(shape):
            stale.append((c, f"computed for samples of shape {tuple(c.shape)}, this run samples {tuple(shape)}"))
        else:
            valid.append(c)
    return valid, stale


def valid_calibration(run, nfe: int, guidance: Optional[float], shape: Optional[Sequence[int]] = None
                      ) -> Tuple[Optional[Calibration], Optional[str]]:
    """``(calibration, note)`` for ``sample RUN --nfe K``: the valid stored calibration for budget ``nfe`` and
    this guidance scale with the lowest held-out RMSE, or None; ``note`` is one line saying why stale files
    at that budget were ignored (None when there were none)."""
    g = None if guidance is None else float(guidance)
    at = [c for c in stored_calibrations(run) if c.budget_nfe == int(nfe) and c.guidance == g]
    if not at:
        return None, None
    valid, stale = _split_valid(run, at, shape)
    note = None
    if stale:
        c, why = stale[0]
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        note = f"ignored {calibration_file(run, c)}{more}: {why}"
    if not valid:
        return None, note
    return min(valid, key=lambda c: c.holdout_rmse if c.holdout_rmse is not None else float("inf")), note


def register(sub) -> None:
    c = sub.add_parser("calibrate", help="fit a solver to a trained run at a given NFE and store it beside the run")
    c.add_argument("run")
    c.add_argument("--nfe", type=flags.positive_int, required=True, help="velocity evaluations per sample")
    c.add_argument("--kind", default="learned", help=f"one of: {', '.join(calibration_kinds())}")
    c.add_argument("--solver", default="auto",
                   help="starting solver (learned, dc; auto = the best classical one at this NFE), the solver "
                        "(boss), or a +-joined candidate list (search)")
    c.add_argument("--mode", default=None, help="learned: auto (default), ls (no backpropagation), grad, ls+grad")
    c.add_argument("--batch", type=flags.positive_int, default=None,
                   help="pin the calibration (and held-out) batch size; default for learned/dc: self-sized within "
                        "--budget (other kinds: 256)")
    c.add_argument("--budget", type=float, default=None,
                   help=f"CPU seconds a learned/dc calibration may take while it sizes its own batches "
                        f"(default {DEFAULT_BUDGET_S:g})")
    c.add_argument("--rtol", type=float, default=1e-5,
                   help="tolerance of the float64 dopri5 reference (learned, dc)")
    c.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale to calibrate at")
    c.add_argument("--recompute", action="store_true", help="recompute even if a stored calibration matches")
    flags.add_seed(c)
    flags.add_device(c)
    flags.add_quiet(c)
    c.set_defaults(fn=cmd_calibrate)
