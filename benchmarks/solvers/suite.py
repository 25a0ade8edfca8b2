"""Solver accuracy at equal NFE: straightflow's solvers and time grids against peer libraries.

Everything runs in ONE process, with pinned threads, on the SAME velocity field and the SAME
noise for every method:

* Fields. ``oracle2d`` / ``oracle64d``: the exact velocity of a Gaussian mixture
  (:meth:`straightflow.oracle.GaussianMixtureFlow.random`, 8 components, float64).
  ``checkerboard``: a 2D MLP flow; ``digits``: an 8x8 UNet flow (float32), both trained with
  :func:`straightflow.runs.train_run` into ``out_dir/runs/`` (reused when present) unless
  ``runs={"2d": dir, "digits": dir}`` names existing run directories.
* Reference. From the same noise: straightflow's ``dopri5`` (rtol = atol = 1e-8, float64; a
  float64 copy of a trained network) when that solver is registered, else RK4 with 2048 uniform
  steps in float64. The Markdown says which, with its NFE.
* Methods, at each target NFE (equal NFE, never equal steps). Every deterministic fixed-step
  straightflow solver of the registry (solver modules not yet imported by
  ``straightflow.solvers`` are imported first, so new solvers are picked up) on: the uniform
  grid; every other registered grid (``shifted`` = SD3 shift 3, ``logsnr``, ``karras``) only
  where it helps, i.e. where it beats the uniform grid for that solver at a probe NFE on the
  calibration batch; the BOSS grid for that solver and NFE (:mod:`straightflow.optimize`:
  the same computation as ``boss_grid``, with one cost table per solver reused across NFE);
  and the searched schedule (``optimize.search_schedule``). BOSS and the search use a separate
  calibration batch (other noise), never the evaluation batch. The step count for a target
  NFE is the largest whose *counted* NFE does not exceed it (probed with a trivial field); a
  combination whose counted NFE is not the target is skipped (``-`` in the tables).
  Peers: diffusers ``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``
  (``2N - 1`` calls for N steps: odd NFE only), ``DPMSolverMultistepScheduler`` and
  ``UniPCMultistepScheduler`` (``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``,
  ``flow_shift=1.0``, ``solver_order=2``); ``torchdiffeq.odeint`` (euler, midpoint, rk4 on the
  uniform grid; dopri5 adaptive, reported with its counted NFE); ``flow_matching.solver.ODESolver``
  (euler, midpoint, rk4); the ``rectified-flow`` package's deterministic samplers (``euler``,
  ``curved_euler``). Diffusers convention: sigma = 1 - t, model output = -v(x, 1 - sigma), the
  timestep argument is sigma * 1000; the velocity is evaluated at the scheduler's own float
  sigma for the current call (its integer timesteps are only used to index).
  ``DPMSolverMultistepScheduler``'s shipped flow sigmas start at sigma = 0.999, not 1 (the
  first state is taken to be x at t = 0.001), which leaves an error floor of ~1e-3 on the oracle
  however many steps; the benchmark sets its sigmas to the exact uniform grid 1 -> 0 (float32,
  as the scheduler stores them). UniPC's shipped flow sigmas start at 1 and converge: they are
  kept. The oracle sections show the convergence of both grids for both schedulers.
  Every peer's NFE is counted by a wrapper around the velocity.
* Metric: endpoint RMSE to the reference over all elements (same noise). For the trained
  models also a distribution metric at NFE 4 and 8 for the best few methods of each side:
  exact W2 to held-out data (2D) and the classifier Frechet distance (digits), each with its
  data-vs-data floor (:func:`straightflow.metrics.evaluate`).
* Overhead: per velocity call with a trivial field (``v = -x``) on a 4096 x 64 float32 batch:
  straightflow's ``sample`` against each diffusers scheduler's ``step`` and the other peers'
  loops; medians after a warm-up, contenders interleaved, same process and thread count.

Outputs ``out_dir/solvers.md``, ``out_dir/solvers.json`` and ``out_dir/solvers-<field>.png``.
Run ``straightflow bench solvers --out DIR`` (``--quick``: a pipeline check, about 8 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from straightflow import grids as sfgrids, metrics
from straightflow.optimize import run_schedule
from straightflow.solvers import CountedVelocity, available, get_solver, sample
from straightflow.system import machine_line

from ..harness import command_line, log_to, register_suite, run_suite, write_report
from . import calibrated as scal
from .fields import Field, FieldSkipped, fixed_noise, make_field, reference_solution
from .methods import (COST_MISMATCH, CalibrationBatch, Method, boss_method, endpoint_rmse, fixed_method, peer_method, search_method,
                      sf_steps_for_nfe)
from .peers import Peer, make_peers
from .report import calibrated_summary_data, markdown_report, plot_field, plot_summary, table_summary
from .settings import (DEFAULT_FIELDS, DEFAULT_NFES, FIELD_ALIASES, FIELD_CACHE_VERSION, METRIC_NFES, QUALITY_NFE,
                       QUALITY_SOLVER, QUICK_NFES, QUICK_REF_RTOL, REF_RTOL, REF_RTOL_TRAINED, SEARCH_CANDIDATES)

__all__ = ["DEFAULT_FIELDS", "DEFAULT_NFES", "QUICK_NFES", "bench_solvers", "make_peers", "sf_steps_for_nfe", "main"]


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[bench solvers] {msg}", flush=True)


def _bench_field(fld: Field, nfes: Sequence[int], peers: list[Peer], peer_info: dict[str, Any], quick: bool,
                 progress: bool, search_max_nfe: int, fine_steps: int, seed: int = 0,
                 cal_kinds: Sequence[str] = scal.CAL_KINDS, cal_rtol: float | None = None) -> dict[str, Any]:

    t_field = time.perf_counter()
    reference_solution(fld, QUICK_REF_RTOL if quick else (REF_RTOL if fld.dtype == torch.float64 else REF_RTOL_TRAINED))
    _log(f"{fld.name}: reference {fld.ref_desc}", progress)
    cal = CalibrationBatch(fld, fine_steps)
    specs = [get_solver(s) for s in available()]
    fixed = [s.name for s in specs if not s.stochastic and not s.adaptive]
    skipped_solvers = {s.name: ("stochastic" if s.stochastic else "adaptive (separate table)")
                       for s in specs if s.stochastic or s.adaptive}
    failures: list[str] = []

    # which named grids help which solver: probe on the calibration batch against its reference
    probe = 6 if 6 in nfes else sorted(nfes)[len(nfes) // 2]
    extra_grids = [g for g in sfgrids.available() if g != "uniform"]
    grid_choice: dict[str, dict[str, float]] = {}
    methods: list[Method] = []
    for s in fixed:
        methods.append(fixed_method(fld, s, "uniform"))
        steps = sf_steps_for_nfe(s, probe)
        if steps is None:
            continue
        errs = {}
        for g in ["uniform"] + extra_grids:
            try:
                r = sample(fld.model, fld.calib, solver=s, steps=steps, grid=g, cond=fld.calib_cond)
                errs[g] = endpoint_rmse(r.x, cal.ref.end)
            except Exception as e:
                errs[g] = float("nan")
                failures.append(f"{s} / {g} (grid probe): {type(e).__name__}: {e}")
        grid_choice[s] = errs
        for g in extra_grids:
            if math.isfinite(errs.get(g, math.nan)) and errs[g] < errs.get("uniform", math.inf):
                methods.append(fixed_method(fld, s, g))
    for s in fixed if fld.evals_per_call == 1 else ():  # guided field: no BOSS (cost; the unguided fields have it)
        methods.append(boss_method(fld, cal, s))
    cands = [c for c in SEARCH_CANDIDATES if c in fixed]
    if cands and fld.evals_per_call == 1:  # the search's budget counts model calls, not guided evaluations
        methods.append(search_method(fld, cal, cands, search_max_nfe))
    methods += [peer_method(p, fld) for p in peers]

    results: list[dict[str, Any]] = []
    for m in methods:
        t_m = time.perf_counter()
        for nfe in nfes:
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = m.run(fld.noise, fld.cond, nfe)
                if out is None:
                    continue
                x, counted_nfe, extra = out
                secs = time.perf_counter() - t0
            except Exception as e:
                failures.append(f"{m.name} at NFE {nfe}: {type(e).__name__}: {str(e)[:200]}")
                continue
            # under guidance every evaluation counts 2 NFE; the columns are evaluations
            counted = counted_nfe // fld.evals_per_call
            if counted_nfe % fld.evals_per_call or counted > nfe or (m.kind != "search" and counted != nfe):
                failures.append(f"{m.name} at NFE {nfe}: counted {counted_nfe} NFE, skipped")
                continue
            err = endpoint_rmse(x, fld.ref)
            if not math.isfinite(err):
                failures.append(f"{m.name} at NFE {nfe}: non-finite output")
                continue
            results.append({"method": m.name, "library": m.library, "kind": m.kind, "solver": m.solver,
                            "grid": m.grid, "nfe_target": nfe, "nfe": counted, "nfe_counted": counted_nfe,
                            "rmse": err, "seconds": secs, **extra})
        _log(f"{fld.name}: {m.name} ({time.perf_counter() - t_m:.1f} s)", progress)

    log = log_to("solvers", progress)
    cal_rows, cal_rec, cal_run = scal.calibration_section(fld, nfes, seed, quick, failures, log, cal_rtol, cal_kinds)
    results += cal_rows
    transfer = scal.transfer_section(cal_run, results, peers, nfes, failures, log) if cal_run is not None else {}
    fld.cal_run = cal_run  # for the distribution metrics
    adaptive = _adaptive_rows(fld, peer_info, quick, failures)
    check = _diffusers_check(fld, peer_info, quick, failures) if fld.name.startswith("oracle") else []
    return {"title": fld.title, "source": fld.source, "reference": fld.ref_desc, "n": int(fld.noise.shape[0]),
            "guidance": fld.guidance, "evals_per_call": fld.evals_per_call,
            "calibration_kinds": cal_rec, "transfer": transfer,
            "calibration": {"n": int(fld.calib.shape[0]), "reference": f"rk4, {cal.ref.fine_steps} fine steps",
                            "reference_nfe": cal.ref.nfe, "boss_table_calls": cal.table_calls,
                            "seconds": round(cal.seconds, 2), "boss_candidates": fld.n_candidates,
                            "search_candidates": cands, "search_max_nfe": search_max_nfe},
            "grid_probe": {"nfe": probe, "rmse": grid_choice}, "skipped_solvers": skipped_solvers,
            "results": results, "adaptive": adaptive, "diffusers_check": check, "failures": failures,
            "seconds": round(time.perf_counter() - t_field, 1)}


@torch.no_grad()
def _adaptive_rows(fld: Field, peer_info, quick: bool, failures: list[str]) -> list[dict[str, Any]]:

    rows = []
    tols = (1e-2, 1e-3) if quick else (1e-2, 1e-3, 1e-4)
    for s in available():
        spec = get_solver(s)
        if spec.stochastic or not spec.adaptive:
            continue
        for tol in tols:
            try:
                r = sample(fld.model, fld.noise, solver=s, steps=1, cond=fld.cond, rtol=tol, atol=tol)
                rows.append({"method": f"straightflow {s}", "tol": tol, "nfe": r.nfe, "rmse": endpoint_rmse(r.x, fld.ref)})
            except Exception as e:
                failures.append(f"{s} tol {tol}: {type(e).__name__}: {e}")
    td = (peer_info.get("torchdiffeq") or {}).get("adaptive")
    if td is not None:
        for tol in tols:
            c = CountedVelocity(fld.model, fld.cond, check_finite=False)
            try:
                y = td(c, fld.noise.clone(), tol)
                rows.append({"method": "torchdiffeq dopri5", "tol": tol, "nfe": c.nfe, "rmse": endpoint_rmse(y, fld.ref)})
            except Exception as e:
                failures.append(f"torchdiffeq dopri5 tol {tol}: {type(e).__name__}: {e}")
    return rows


@torch.no_grad()
def _diffusers_check(fld: Field, peer_info, quick: bool, failures: list[str]) -> list[dict[str, Any]]:
    """Convergence of the diffusers multistep schedulers on the oracle: their shipped flow sigmas
    against the exact uniform grid 1 -> 0 (the tables use the one marked ``used``)."""
    info = peer_info.get("diffusers")
    if not info:
        return []
    rows = []
    steps_list = (4, 16, 64) if quick else (4, 16, 64, 256)
    for name, v in info["variants"].items():
        for key in ("shipped", "exact"):
            errs = {}
            for s in steps_list:
                c = CountedVelocity(fld.model, fld.cond, check_finite=False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        errs[s] = endpoint_rmse(v[key](c, fld.noise.clone(), s), fld.ref)
                    except Exception as e:
                        failures.append(f"{name} check: {type(e).__name__}: {e}")
            label = "shipped flow sigmas" if key == "shipped" else "exact uniform sigmas 1 -> 0"
            rows.append({"method": name, "variant": label, "used": v["used"] == key, "rmse": errs})
    return rows


# ============================================================================ distribution metrics
@torch.no_grad()
def _distribution_metrics(fld: Field, res: dict[str, Any], methods_by_name: dict[str, Method], nfes: Sequence[int],
                          n_metric: int, top: int, seed: int, failures: list[str]) -> list[dict[str, Any]]:

    if fld.data is None:
        return []
    rows = []
    shape = tuple(fld.noise.shape[1:])
    x = fixed_noise((n_metric, *shape), seed + 2, fld.dtype)
    cond = None
    if fld.cond:
        nc = int(max(int(v.max()) for v in fld.cond.values())) + 1
        cond = {"y": torch.arange(n_metric) % nc}
    epc = fld.evals_per_call
    for nfe in (k for k in METRIC_NFES if k in nfes):
        at = [r for r in res["results"] if r["nfe_target"] == nfe]
        chosen = []
        for lib_is_sf in (True, False):
            side = sorted((r for r in at if (r["library"] == "straightflow") == lib_is_sf), key=lambda r: r["rmse"])
            chosen += side[:top]
        for pred in (lambda r: r["kind"] == "calibrated", lambda r: r["kind"] == "fixed grid"):
            best = min((r for r in at if pred(r)), key=lambda r: r["rmse"], default=None)
            if best is not None and best not in chosen:  # always: the best calibrated and the best fixed solver
                chosen.append(best)
        for r in chosen:
            m = methods_by_name.get(r["method"])
            if m is None:
                continue
            try:
                out = m.run(x, cond, nfe)
                if out is None:
                    continue
                y, counted, _ = out
                rep = metrics.evaluate(y.float(), fld.data, metric=fld.metric, seed=seed, extractor=fld.extractor)
                rows.append({"method": r["method"], "library": r["library"], "kind": r["kind"], "nfe": counted // epc,
                             "nfe_target": nfe, "metric": rep.name, "value": rep.value, "floor": rep.floor,
                             "ratio": rep.ratio, "n": rep.n, "rmse_eval_batch": r["rmse"]})
            except Exception as e:
                failures.append(f"metric {r['method']} NFE {nfe}: {type(e).__name__}: {e}")
    # a good fixed solver at many evaluations: what NFE 4 is compared with
    try:
        steps = sf_steps_for_nfe(QUALITY_SOLVER, QUALITY_NFE)
        r = sample(fld.model, x, solver=QUALITY_SOLVER, steps=steps, cond=cond)
        rep = metrics.evaluate(r.x.float(), fld.data, metric=fld.metric, seed=seed, extractor=fld.extractor)
        rows.append({"method": f"{QUALITY_SOLVER} / uniform", "library": "straightflow", "kind": "fixed grid",
                     "nfe": r.nfe // epc, "nfe_target": QUALITY_NFE, "metric": rep.name, "value": rep.value,
                     "floor": rep.floor, "ratio": rep.ratio, "n": rep.n, "rmse_eval_batch": None})
    except Exception as e:
        failures.append(f"metric {QUALITY_SOLVER} NFE {QUALITY_NFE}: {type(e).__name__}: {e}")
    return rows


# ============================================================================ overhead
def _overhead(peers: list[Peer], quick: bool, seed: int) -> dict[str, Any]:

    B, D = 4096, 64
    steps = 10 if quick else 50
    repeats = 3 if quick else 15
    x0 = fixed_noise((B, D), seed, torch.float32)

    def vel(x, t):
        return -x

    def sf(solver: str, **kw):
        def go():
            return sample(vel, x0, solver=solver, steps=steps, **kw).nfe

        return go

    def bare():
        x, h = x0, 1.0 / steps
        for i in range(steps):
            t = torch.full((B,), i * h)
            x = x + h * vel(x, t)
        return steps

    def velocity_only():
        t = torch.full((B,), 0.5)
        for _ in range(steps):
            vel(x0, t)
        return steps

    contenders: list[tuple[str, Callable[[], int], str]] = [
        ("velocity alone (v = -x)", velocity_only, ""),
        ("bare loop (x += h v)", bare, ""),
        ("straightflow sample euler", sf("euler"), ""),
        ("straightflow sample euler, check_finite=False", sf("euler", check_finite=False), ""),
        ("straightflow sample heun", sf("heun"), ""),
        ("straightflow sample dpm++2m", sf("dpm++2m"), ""),
        ("straightflow sample unipc", sf("unipc"), ""),
        ("straightflow sample deis-pc", sf("deis-pc"), ""),
    ]
    pair = {"diffusers FlowMatchEuler": "straightflow sample euler",
            "diffusers FlowMatchHeun": "straightflow sample heun",
            "diffusers DPM++2M": "straightflow sample dpm++2m",
            "diffusers UniPC": "straightflow sample unipc",
            "torchdiffeq euler": "straightflow sample euler",
            "flow_matching euler": "straightflow sample euler",
            "rectified-flow euler": "straightflow sample euler"}
    for p in peers:
        if p.name not in pair:
            continue
        st = p.steps_for(steps if p.nfe_of(steps) == steps else steps - 1) or steps

        def go(p=p, st=st):
            c = CountedVelocity(lambda x, t: -x, check_finite=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p.run(c, x0, st)
            return c.calls

        contenders.append((p.name, go, pair[p.name]))
    times: dict[str, list[float]] = {c[0]: [] for c in contenders}
    nfe_of: dict[str, int] = {}
    with torch.no_grad():
        for name, go, _ in contenders:  # warm-up
            nfe_of[name] = go()
        for r in range(repeats):
            k = r % len(contenders)
            for name, go, _ in contenders[k:] + contenders[:k]:
                t0 = time.perf_counter()
                n = go()
                times[name].append((time.perf_counter() - t0) * 1e6 / n)
    rows = []
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["straightflow sample euler"]
    v_alone = med["velocity alone (v = -x)"]
    for name, _, partner in contenders:
        q25, q75 = np.percentile(times[name], [25, 75])
        own = med[name] - v_alone  # the solver's own cost per call: time per call minus the velocity's
        own_p = (med[partner] - v_alone) if partner else None
        rows.append({"contender": name, "us_per_call": med[name], "iqr": float(q75 - q25), "nfe_per_run": nfe_of[name],
                     "ratio_to_sf_euler": med[name] / base, "partner": partner,
                     "ratio_to_partner": (med[name] / med[partner]) if partner else None,
                     "own_us": own,
                     "own_ratio_to_partner": (own / own_p) if (partner and own_p and own_p > 0) else None})
    return {"batch": [B, D], "dtype": "float32", "steps": steps, "repeats": repeats, "rows": rows}


# ============================================================================ entry point
def bench_solvers(
    out_dir: str | os.PathLike,
    fields: Sequence[str] = DEFAULT_FIELDS,
    nfes: Sequence[int] | None = None,
    n: int | None = None,
    seed: int = 0,
    threads: int = 1,
    runs: dict[str, str] | None = None,
    quick: bool = False,
    overhead: bool = True,
    progress: bool = True,
    search_max_nfe: int | None = None,
    metric_samples: int | None = None,
    metric_top: int = 3,
    command: str | None = None,
    cal_kinds: Sequence[str] = scal.CAL_KINDS,
    cal_rtol: float | None = None,
    reuse_fields: bool = False,
) -> str:
    """Benchmark every deterministic straightflow solver x grid against the peers at equal NFE.

    Writes ``solvers.md``, ``solvers.json`` and ``solvers-<field>.png`` to ``out_dir`` and returns
    the Markdown. ``fields``: ``oracle2d``, ``oracle64d``, ``checkerboard`` (or another 2D toy
    name such as ``moons``; ``2d`` means checkerboard), ``digits``. ``n``: evaluation batch for
    every field (default: per field, see ``SIZES``). ``runs``: ``{"2d": run_dir, "digits":
    run_dir}`` to use trained runs instead of training small ones into ``out_dir/runs``.
    ``quick``: tiny sizes for tests. No timing is asserted anywhere. ``cal_kinds``: the calibration
    kinds measured at NFE 3-10 (:mod:`.solvers_calibrated`); ``cal_rtol``: their reference tolerance
    (default 1e-8 on the oracle fields, 1e-6 on trained networks). ``reuse_fields``: a field already
    measured with the same settings (``out_dir/fields/<field>.json``) is read back, not recomputed
    (lets fields run in separate processes into one report).
    """
    if threads < 1:
        raise ValueError("threads must be >= 1")
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nfes = tuple(int(k) for k in (nfes if nfes is not None else (QUICK_NFES if quick else DEFAULT_NFES)))
    if not nfes or min(nfes) < 1:
        raise ValueError(f"nfes must be positive integers, got {nfes}")
    fields = tuple(FIELD_ALIASES.get(f, f) for f in fields)
    search_max_nfe = search_max_nfe if search_max_nfe is not None else (8 if quick else 10)
    metric_samples = metric_samples or (200 if quick else 1000)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peers, peer_info, peers_skipped = make_peers()
        notes = []
        rf = peer_info.get("rectified-flow") or {}
        if rf.get("note"):
            notes.append(f"rectified-flow: {rf['note']}")
        if rf.get("stochastic_skipped"):
            notes.append("rectified-flow stochastic samplers not in the RMSE tables (no deterministic endpoint): "
                         + ", ".join(rf["stochastic_skipped"]))
        fields_out: dict[str, Any] = {}
        fields_skipped: dict[str, str] = {}
        key = {"nfes": list(nfes), "quick": quick, "seed": seed, "n": n, "cal_kinds": list(cal_kinds),
               "cal_rtol": cal_rtol, "metric_samples": metric_samples, "search_max_nfe": search_max_nfe,
               "runs": dict(runs or {}), "version": FIELD_CACHE_VERSION}
        for fname in fields:
            cache = out / "fields" / f"{fname}.json"
            if reuse_fields and cache.is_file():
                saved = json.loads(cache.read_text())
                if saved.get("key") == json.loads(json.dumps(key)):
                    fields_out[fname] = saved["field"]
                    notes.append(f"field {fname}: measured by an earlier run with the same settings and read back "
                                 f"from `fields/{fname}.json`" + (f" (`{saved['command']}`)" if saved.get("command") else ""))
                    plot_field(out / f"solvers-{fname}.png", fname, saved["field"])
                    _log(f"field {fname}: reused {cache}", progress)
                    continue
            _log(f"field {fname}", progress)
            try:
                fld = make_field(fname, out, runs, quick, seed, n, progress)
            except FieldSkipped as e:
                fields_skipped[fname] = str(e)
                _log(f"field {fname} skipped: {e}", progress)
                continue
            fo = _bench_field(fld, nfes, peers, peer_info, quick, progress, search_max_nfe,
                              fine_steps=128 if quick else 256, seed=seed, cal_kinds=cal_kinds, cal_rtol=cal_rtol)
            if fld.data is not None:
                fo["metrics"] = _distribution_metrics(fld, fo, _methods_for_metrics(fld, fo, peers), nfes,
                                                      metric_samples, metric_top, seed, fo["failures"])
            fields_out[fname] = fo
            write_report(out / "fields", fname, f"see ../solvers.md ({fname})\n",
                         {"key": key, "field": fo, "command": command, "date": _dt.date.today().isoformat()})
            plot_field(out / f"solvers-{fname}.png", fname, fo)
            _log(f"{fname} done ({fo['seconds']} s)", progress)
        ov = _overhead(peers, quick, seed) if overhead else None
    finally:
        torch.set_num_threads(prev_threads)

    summary = table_summary(fields_out, nfes)
    cal_summary = calibrated_summary_data(fields_out, nfes)
    summary_plot = plot_summary(out / "solvers-summary.png", cal_summary)
    load = ""
    try:
        load = " Load average at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + "."
    except OSError:
        pass
    cmd = command or command_line("solvers", [
        "--out", str(out), "--fields", ",".join(fields), "--nfes", ",".join(map(str, nfes)), "--seed", str(seed),
        "--threads", str(threads), *(["--n", str(n)] if n else []), *(["--quick"] if quick else []),
        *(["--cal-kinds", ",".join(cal_kinds) or "none"] if tuple(cal_kinds) != scal.CAL_KINDS else []),
        *(["--cal-rtol", f"{cal_rtol:g}"] if cal_rtol else []),
        *[a for k, v in (runs or {}).items() for a in (f"--run-{k}", str(v))]])
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    ml = machine_line()
    torch.set_num_threads(prev)
    meta = {"machine": ml, "cpus": os.cpu_count(), "threads": threads, "date": _dt.date.today().isoformat(),
            "load": load, "command": cmd, "quick": quick, "nfes": list(nfes), "fields": list(fields),
            "peer_versions": {k: v.get("version", "?") for k, v in peer_info.items()},
            "peers_skipped": peers_skipped, "fields_skipped": fields_skipped,
            "notes": notes + [f"{k}: its registered NFE cost disagrees with the counted one ({v}); its step counts "
                              "come from counted runs" for k, v in sorted(COST_MISMATCH.items())],
            "summary_plot": summary_plot, "seed": seed, "peer_notes": {p.name: p.note for p in peers if p.note}, "metric_top": metric_top,
            "torch": torch.__version__, "seconds": time.perf_counter() - t_start}
    md = markdown_report(meta, fields_out, summary, ov, nfes, cal_summary)
    write_report(out, "solvers", md, {"meta": meta, "summary": summary, "calibrated_summary": cal_summary,
                                      "fields": fields_out, "overhead": ov})
    return md


def _methods_for_metrics(fld: Field, fo: dict[str, Any], peers: list[Peer]) -> dict[str, Method]:
    """Rebuild the methods by name for the metric runs (BOSS grids/schedules from the stored calibration)."""

    out: dict[str, Method] = {}
    res = fo["results"]
    for r in res:
        name = r["method"]
        if name in out:
            continue
        if r["library"] != "straightflow":
            p = next((p for p in peers if p.name == name), None)
            if p is not None:
                out[name] = peer_method(p, fld)
        elif r["kind"] == "fixed grid":
            out[name] = fixed_method(fld, r["solver"], r["grid"])
        elif r["kind"] == "calibrated":
            def run_cal(x, cond, nfe, kind=r["calibration_kind"]):
                cal = (fld.cal_run.cals if fld.cal_run is not None else {}).get((kind, nfe))
                if cal is None:
                    return None
                rr = sample(fld.raw, x, solver=cal, cond=cond)
                return rr.x, rr.nfe, {}

            out[name] = Method(name, "straightflow", "calibrated", run_cal, "auto", "learned")
        else:  # BOSS / search: replay the stored grid (and schedule) of that NFE
            table = {q["nfe_target"]: q for q in res if q["method"] == name}

            def run(x, cond, nfe, table=table, kind=r["kind"], solver=r["solver"]):
                q = table.get(nfe)
                if q is None:
                    return None
                g = torch.tensor(q["grid"], dtype=torch.float64)
                if kind == "search":
                    rr = run_schedule(fld.model, x, g, q["solvers"], cond=cond)
                else:
                    rr = sample(fld.model, x, solver=solver, grid=g, cond=cond)
                return rr.x, rr.nfe, {}

            out[name] = Method(name, "straightflow", r["kind"], run, r["solver"], r["grid"])
    return out


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fields", default=",".join(DEFAULT_FIELDS),
                   help="oracle2d, oracle64d, checkerboard (or another 2D toy; 2d = checkerboard), digits, "
                        "digits-cfg (class-conditional, guidance 2), mnist (opt-in: training costs ~an hour on CPU)")
    p.add_argument("--nfes", default=None, help="comma-separated NFE list (default 3-10)")
    p.add_argument("--n", type=int, default=None, help="evaluation batch of every field (default: per field)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-2d", default=None, help="a trained 2D run directory (else one is trained and cached)")
    p.add_argument("--run-digits", default=None, help="a trained digits run directory")
    p.add_argument("--run-digits-cfg", default=None, help="a trained class-conditional digits run directory")
    p.add_argument("--run-mnist", default=None, help="a trained MNIST run directory")
    p.add_argument("--cal-kinds", default=",".join(scal.CAL_KINDS),
                   help="calibration kinds measured at NFE 3-10 (comma-separated; 'none' for none)")
    p.add_argument("--cal-rtol", type=float, default=None,
                   help="dopri5 tolerance of the calibration reference (default 1e-8 oracle, 1e-6 trained networks)")
    p.add_argument("--reuse-fields", action="store_true",
                   help="read back fields already measured with the same settings (OUT/fields/<field>.json)")
    p.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead section")
    p.add_argument("--generalise", action="store_true",
                   help="only the generalisation section: random sharp mixtures in --dims, --draws fields each, "
                        "calibrated with the library defaults, vs the best peer (OUT/generalise.md)")
    p.add_argument("--dims", default="2,16,64", help="--generalise: dimensions")
    p.add_argument("--draws", type=int, default=5, help="--generalise: random fields per dimension")
    p.add_argument("--cal-seeds", type=int, default=5, help="--generalise: calibration seeds on one field (the spread)")


def run(a: argparse.Namespace) -> int:
    runs = {k: v for k, v in (("2d", a.run_2d), ("digits", a.run_digits), ("digits-cfg", a.run_digits_cfg),
                              ("mnist", a.run_mnist)) if v}
    kinds = tuple(k for k in a.cal_kinds.split(",") if k and k != "none")
    nfes = [int(v) for v in a.nfes.split(",")] if a.nfes else None
    if a.generalise:
        from .generalise import bench_generalise

        torch.set_num_threads(a.threads)
        peers, peer_info, _ = make_peers()
        cmd = a.command or command_line("solvers", ["--generalise", "--out", str(a.out), "--dims", a.dims,
                                                    "--draws", str(a.draws), "--cal-seeds", str(a.cal_seeds),
                                                    "--threads", str(a.threads),
                                                    *(["--nfes", a.nfes] if a.nfes else []),
                                                    *(["--quick"] if a.quick else [])])
        print(bench_generalise(a.out, peers, peer_info, cmd, threads=a.threads,
                               dims=tuple(int(v) for v in a.dims.split(",")), draws=a.draws,
                               nfes=tuple(nfes or range(4, 11)), seeds=a.cal_seeds, quick=a.quick,
                               log=lambda m: _log(m, True)))
        return 0
    md = bench_solvers(a.out, fields=[f for f in a.fields.split(",") if f], nfes=nfes, n=a.n, seed=a.seed,
                       threads=a.threads, runs=runs or None, quick=a.quick, overhead=not a.no_overhead,
                       command=a.command, cal_kinds=kinds, cal_rtol=a.cal_rtol, reuse_fields=a.reuse_fields)
    print(md)
    return 0


SUITE = register_suite("solvers", "solver error vs NFE against diffusers, torchdiffeq, flow_matching, rectified-flow",
                       _arguments, run, doc=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    """``straightflow bench solvers ARGS``."""
    return run_suite("solvers", argv)

