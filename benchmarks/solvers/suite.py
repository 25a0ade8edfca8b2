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
Run ``straightflow bench solvers --out DIR`` (``--quick`` for a seconds-long check).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib
import json
import math
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from straightflow import grids as sfgrids, metrics
from straightflow.checkpoint import run_info
from straightflow.optimize import bellman_path, boss_cost_table, reference_trajectory, run_schedule, search_schedule
from straightflow.oracle import GaussianMixtureFlow
from straightflow.paths import get_path
from straightflow.report import reference_data
from straightflow.solvers import CountedVelocity, available, get_solver, initial_noise, sample
from straightflow.solvers.guidance import ClassifierFreeGuidance
from straightflow.system import machine_line
from . import solvers_calibrated as scal
from .harness import cached_model, command_line, log_to, register_suite, run_suite, write_report

__all__ = ["DEFAULT_FIELDS", "DEFAULT_NFES", "bench_solvers", "make_peers"]

DEFAULT_FIELDS = ("oracle2d", "oracle64d", "checkerboard", "digits", "digits-cfg")
OPTIONAL_FIELDS = ("mnist",)  # opt-in (--fields ...,mnist): training and the float64 reference cost ~an hour on CPU
DEFAULT_NFES = (3, 4, 5, 6, 7, 8, 9, 10)
QUICK_NFES = (3, 4, 5, 8, 15, 20)
METRIC_NFES = (4, 8)
QUALITY_NFE = 100  # the distribution metric of a good fixed solver at this NFE, next to NFE 4
QUALITY_SOLVER = "rk4"  # 25 steps = 100 NFE
GUIDANCE = 2.0  # the classifier-free guidance scale of the digits-cfg field
SEARCH_CANDIDATES = ("euler", "midpoint", "heun")
REF_RTOL = 1e-8
REF_RTOL_TRAINED = 1e-6  # float32 networks (run in float64 for the reference): their own rounding is ~1e-7
QUICK_REF_RTOL = 1e-6  # --quick: numbers not meaningful, the reference need not be 1e-8 exact
REF_RK4_STEPS = 2048
_FIELD_CACHE_VERSION = 1
FIELD_ALIASES = {"2d": "checkerboard", "moons": "moons", "checkerboard": "checkerboard", "image": "digits",
                 "cfg": "digits-cfg"}

# per-field sizes: (eval batch, calibration batch, BOSS candidates for non-Euler solvers)
_SIZES = {"oracle2d": (1000, 256, 32), "oracle64d": (256, 64, 32), "checkerboard": (1000, 256, 32),
          "moons": (1000, 256, 32), "digits": (128, 32, 24), "digits-cfg": (128, 32, 24),
          "mnist": (64, 16, 12)}
_QUICK_SIZES = (192, 48, 12)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[bench solvers] {msg}", flush=True)


# ============================================================================ solvers & counting
_STEPS_CACHE: dict[tuple[str, int], int | None] = {}


def _probe_nfe(solver: str, steps: int) -> int:

    r = sample(lambda x, t: -x, torch.ones(1, 2, dtype=torch.float64), solver=solver, steps=steps)
    return int(r.nfe)


def sf_steps_for_nfe(solver: str, nfe: int) -> int | None:
    """Largest step count whose counted NFE is <= ``nfe``; None unless it is exactly ``nfe``.

    Starts from ``spec.steps_for_nfe`` and corrects it with counted probes on a trivial field
    (multistep solvers with a warm-up cost more than ``evals_per_step * steps``)."""

    key = (get_solver(solver).name, int(nfe))
    if key in _STEPS_CACHE:
        return _STEPS_CACHE[key]
    s = max(1, get_solver(solver).steps_for_nfe(nfe))
    while s > 1 and _probe_nfe(solver, s) > nfe:
        s -= 1
    while s < nfe and _probe_nfe(solver, s + 1) <= nfe:
        s += 1
    out = s if _probe_nfe(solver, s) == nfe else None
    _STEPS_CACHE[key] = out
    return out


def _rmse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


# ============================================================================ peers
@dataclass
class Peer:
    """A peer method: ``run(velocity, x0, steps) -> x1`` with ``velocity(x, t)`` counted."""

    name: str
    library: str
    nfe_of: Callable[[int], int]  # NFE of ``steps`` steps (as documented; checked by counting)
    run: Callable[[Callable, Tensor, int], Tensor]
    note: str = ""

    def steps_for(self, nfe: int) -> int | None:
        for s in range(max(1, nfe), 0, -1):
            if self.nfe_of(s) == nfe:
                return s
        return None


def _diffusers_loop(make: Callable, exact_sigmas: bool) -> Callable[[Callable, Tensor, int], Tensor]:
    def run(vel: Callable, x: Tensor, steps: int) -> Tensor:
        sched = make()
        sched.set_timesteps(steps)
        if exact_sigmas:  # sigma 1 -> 0 uniform (the shipped flow sigmas start at 0.999)
            sig = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
            sched.sigmas = sig.to(torch.float32)
            sched.timesteps = (sig[:-1] * sched.config.num_train_timesteps).round().long()
        for t in sched.timesteps:
            i = 0 if sched.step_index is None else sched.step_index
            sigma = float(sched.sigmas[i])
            out = -vel(x, 1.0 - sigma)
            x = sched.step(out, t, x, return_dict=False)[0]
        return x

    return run


def _diffusers_peers() -> tuple[list[Peer], dict[str, Any]]:
    import diffusers
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=2)
    cfg = "flow_prediction, use_flow_sigmas, flow_shift=1, solver_order=2"

    def dpm():
        return DPMSolverMultistepScheduler(**flow)

    def unipc():
        return UniPCMultistepScheduler(**flow)

    peers = [
        Peer("diffusers FlowMatchEuler", "diffusers", lambda s: s,
             _diffusers_loop(FlowMatchEulerDiscreteScheduler, False), "shipped sigmas 1, ..., 0.001, 0"),
        Peer("diffusers FlowMatchHeun", "diffusers", lambda s: 2 * s - 1,
             _diffusers_loop(FlowMatchHeunDiscreteScheduler, False), "2N-1 calls; last step Euler"),
        # DPM's shipped flow sigmas start at 0.999 (an O(1e-3) error floor): the exact grid is used
        Peer("diffusers DPM++2M", "diffusers", lambda s: s, _diffusers_loop(dpm, True),
             cfg + "; sigmas set to the exact uniform grid 1 -> 0"),
        Peer("diffusers UniPC", "diffusers", lambda s: s, _diffusers_loop(unipc, False),
             cfg + "; shipped sigmas (start at 1)"),
    ]
    variants = {  # both sigma grids of the multistep schedulers, for the convergence check
        "diffusers DPM++2M": {"shipped": _diffusers_loop(dpm, False), "exact": _diffusers_loop(dpm, True), "used": "exact"},
        "diffusers UniPC": {"shipped": _diffusers_loop(unipc, False), "exact": _diffusers_loop(unipc, True), "used": "shipped"},
    }
    return peers, {"version": diffusers.__version__, "variants": variants}


def _torchdiffeq_peers() -> tuple[list[Peer], dict[str, Any]]:
    import torchdiffeq
    from torchdiffeq import odeint

    def fixed(method: str):
        def run(vel, x, steps):
            t = torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype)
            return odeint(lambda tt, y: vel(y, tt), x, t, method=method)[-1]

        return run

    peers = [Peer("torchdiffeq euler", "torchdiffeq", lambda s: s, fixed("euler")),
             Peer("torchdiffeq midpoint", "torchdiffeq", lambda s: 2 * s, fixed("midpoint")),
             Peer("torchdiffeq rk4", "torchdiffeq", lambda s: 4 * s, fixed("rk4"), "3/8-rule RK4")]

    def dopri5(vel, x, tol):
        t = torch.tensor([0.0, 1.0], dtype=x.dtype)
        return odeint(lambda tt, y: vel(y, tt), x, t, method="dopri5", rtol=tol, atol=tol)[-1]

    return peers, {"version": getattr(torchdiffeq, "__version__", "?"), "adaptive": dopri5}


def _flow_matching_peers() -> tuple[list[Peer], dict[str, Any]]:
    from importlib.metadata import version

    from flow_matching.solver import ODESolver

    def fixed(method: str):
        def run(vel, x, steps):
            solver = ODESolver(velocity_model=lambda x, t, **kw: vel(x, t))
            grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype)
            return solver.sample(x_init=x, step_size=None, method=method, time_grid=grid)

        return run

    note = "ODESolver (torchdiffeq inside)"
    peers = [Peer("flow_matching euler", "flow_matching", lambda s: s, fixed("euler"), note),
             Peer("flow_matching midpoint", "flow_matching", lambda s: 2 * s, fixed("midpoint"), note),
             Peer("flow_matching rk4", "flow_matching", lambda s: 4 * s, fixed("rk4"), note)]
    return peers, {"version": version("flow_matching")}


def _import_rectified_flow() -> str:
    """Import the ``rectified-flow`` package. Its ``utils`` module imports torchvision for an
    image-grid helper only; when torchvision is absent a placeholder module stands in during the
    import (the samplers never touch it). Returns a note ('' when nothing was needed)."""
    try:
        importlib.import_module("rectified_flow.samplers")
        return ""
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    for k in [k for k in sys.modules if k == "rectified_flow" or k.startswith("rectified_flow.")]:
        del sys.modules[k]
    stub = types.ModuleType("torchvision")
    stub.__path__ = []  # type: ignore[attr-defined]
    sys.modules["torchvision"] = stub
    try:
        importlib.import_module("rectified_flow.samplers")
    finally:
        if sys.modules.get("torchvision") is stub:
            del sys.modules["torchvision"]
    return "torchvision absent: a placeholder module stood in for it at import (used only by an image-grid helper)"


def _rectified_flow_peers() -> tuple[list[Peer], dict[str, Any]]:
    from importlib.metadata import version

    note = _import_rectified_flow()
    from rectified_flow import RectifiedFlow
    from rectified_flow.samplers import rf_samplers_dict

    def make(kind: str):
        def run(vel, x, steps):
            rf = RectifiedFlow(data_shape=tuple(x.shape[1:]), velocity_field=lambda xt, t: vel(xt, t),
                               interp="straight", source_distribution="normal", dtype=x.dtype)
            sampler = rf_samplers_dict[kind](rf, num_steps=steps)
            sampler.sample_loop(x_0=x)
            return sampler.x_t

        return run

    deterministic = [k for k in ("euler", "curved_euler") if k in rf_samplers_dict]
    skipped = [k for k in rf_samplers_dict if k not in deterministic]
    peers = [Peer(f"rectified-flow {k}", "rectified-flow", lambda s: s, make(k),
                  "updates in float32" + (" (= euler on the straight path)" if k == "curved_euler" else ""))
             for k in deterministic]
    return peers, {"version": version("rectified-flow"), "note": note,
                   "stochastic_skipped": skipped}


def make_peers() -> tuple[list[Peer], dict[str, dict[str, Any]], dict[str, str]]:
    """All importable peers; returns (peers, {library: info}, {library: why skipped})."""
    peers: list[Peer] = []
    info: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for lib, fn in (("diffusers", _diffusers_peers), ("torchdiffeq", _torchdiffeq_peers),
                    ("flow_matching", _flow_matching_peers), ("rectified-flow", _rectified_flow_peers)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, i = fn()
            peers += p
            info[lib] = i
        except Exception as e:
            skipped[lib] = f"not importable: {type(e).__name__}: {e}"
    return peers, info, skipped


# ============================================================================ fields
@dataclass
class Field:
    name: str
    title: str
    model: Callable  # velocity model(x, t, **cond) at run dtype
    dtype: torch.dtype
    noise: Tensor
    calib: Tensor
    model64: Callable | None = None  # float64 version for the reference
    cond: dict[str, Any] | None = None
    calib_cond: dict[str, Any] | None = None
    n_candidates: int = 32
    ref: Tensor | None = None
    ref_desc: str = ""
    data: Tensor | None = None  # held-out data for the distribution metric
    metric: str | None = None
    source: str = ""
    raw: Callable | None = None  # the network itself (``model`` is it under guidance)
    raw64: Callable | None = None
    guidance: float | None = None
    evals_per_call: int = 1  # counted NFE per evaluation (2 under classifier-free guidance)
    extractor: str = "digits"
    cal_run: Any = None  # the calibrations of this field (solvers_calibrated.CalibrationRun)

    def __post_init__(self) -> None:
        if self.raw is None:
            self.raw = self.model
        if self.raw64 is None:
            self.raw64 = self.model64


def _noise(shape, seed: int, dtype: torch.dtype) -> Tensor:
    """Noise drawn in float64 then cast, so the float32 fields see the oracle fields' numbers."""
    return initial_noise(tuple(shape), seed=seed, dtype=torch.float64)[0].to(dtype)


def _train_settings(kind: str, quick: bool) -> dict[str, Any]:
    if kind == "mnist":
        return dict(data="mnist", steps=100 if quick else 4000, batch_size=64, lr=1e-3, warmup=100,
                    base_channels=8 if quick else 16, conditional=False, lr_schedule="cosine")
    if kind in ("digits", "digits-cfg"):
        if kind == "digits-cfg":  # class-conditional with label dropout 0.1 (research/train_cfg_digits.py)
            return {**_train_settings("digits", quick), "conditional": True}
        return dict(data="digits", steps=150 if quick else 1500, batch_size=128, lr=1e-3, warmup=50,
                    base_channels=8 if quick else 16, conditional=False, lr_schedule="cosine")
    return dict(data=kind, steps=200 if quick else 2500, n=50_000, batch_size=256, lr=2e-3, warmup=100,
                hidden=128, depth=3, lr_schedule="cosine")


def _trained_model(kind: str, out: Path, runs: dict[str, str] | None, quick: bool, seed: int,
                   progress: bool) -> tuple[torch.nn.Module, str]:
    key = kind if kind in ("digits", "digits-cfg", "mnist") else "2d"
    recipe = {**_train_settings(kind, quick), "seed": seed, "ckpt_every": 10**9}
    model, run_dir, how = cached_model(out, f"{kind}-quick" if quick else kind, recipe, run=(runs or {}).get(key),
                                       log=log_to("solvers", progress))
    return model, f"`{run_dir}`, {how}"


def _make_field(name: str, out: Path, runs, quick: bool, seed: int, n: int | None, progress: bool) -> Field:

    sizes = _QUICK_SIZES if quick else _SIZES.get(name, (512, 64, 24))
    n_eval = int(n) if n else sizes[0]
    n_cal = sizes[1]
    if name in ("oracle2d", "oracle64d"):
        dim = 2 if name == "oracle2d" else 64
        gm = GaussianMixtureFlow.random(dim, 8, seed=seed)
        f64 = torch.float64
        return Field(name, f"Gaussian-mixture oracle, {dim}D (exact velocity, float64)", gm, f64,
                     _noise((n_eval, dim), seed, f64), _noise((n_cal, dim), seed + 1000, f64), model64=gm,
                     n_candidates=sizes[2], source=f"GaussianMixtureFlow.random({dim}, 8, seed={seed})")
    kind = FIELD_ALIASES.get(name, name)
    if kind == "mnist":
        from straightflow.data import mnist_path
        if mnist_path() is None:
            raise FieldSkipped("MNIST data (mnist_test_10k.npz) not found: set STRAIGHTFLOW_DATA or put it in "
                               "../shared/data (nothing is downloaded)")
    model, source = _trained_model(kind, out, runs, quick, seed, progress)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = run_info(model)
    pname = get_path(info.path).name
    if pname != "linear":
        raise ValueError(f"{name}: the run was trained on the {pname!r} path; the peers' conventions need 'linear'")
    shape, data_source = info.shape, info.data_source
    f32 = torch.float32
    noise, calib = _noise((n_eval, *shape), seed, f32), _noise((n_cal, *shape), seed + 1000, f32)
    cond = calib_cond = None
    nc = getattr(model, "num_classes", None)
    if nc:  # a class-conditional run: labels cycle through the classes
        cond = {"y": torch.arange(n_eval) % nc}
        calib_cond = {"y": torch.arange(n_cal) % nc}
    model64 = copy.deepcopy(model).double()
    raw, raw64, guidance, epc, extractor = model, model64, None, 1, "digits"
    if kind == "digits-cfg":
        if not nc:
            raise ValueError("the digits-cfg run is not class-conditional")
        guidance, epc = GUIDANCE, 2
        model, model64 = ClassifierFreeGuidance(raw, GUIDANCE), ClassifierFreeGuidance(raw64, GUIDANCE)
    if kind in ("digits", "digits-cfg"):
        data, metric = reference_data(data_source, 0).x, "fd"
        title = ("class-conditional digits 8x8 UNet, classifier-free guidance 2 (float32)" if guidance
                 else "digits 8x8, UNet flow (float32)")
    elif kind == "mnist":
        data, metric, extractor = reference_data(data_source, 0).x, "fd", "mnist"
        title = "MNIST 28x28, UNet flow (float32)"
    else:
        data, metric = reference_data(data_source, 4000 if not quick else 600).x, "w2"
        title = f"{data_source} 2D, MLP flow (float32)"
    return Field(name, title, model, f32, noise, calib, model64=model64, cond=cond, calib_cond=calib_cond,
                 n_candidates=sizes[2], data=data, metric=metric, source=source, raw=raw, raw64=raw64,
                 guidance=guidance, evals_per_call=epc, extractor=extractor)


class FieldSkipped(RuntimeError):
    """A field that cannot run here (its data is absent); the report says why."""


@torch.no_grad()
def _reference(fld: Field, rtol: float = REF_RTOL) -> None:

    x = fld.noise.to(torch.float64)
    t0 = time.perf_counter()
    if "dopri5" in available():
        r = sample(fld.model64, x, solver="dopri5", steps=1, cond=fld.cond, rtol=rtol, atol=rtol)
        desc = f"straightflow `dopri5` (rtol = atol = {rtol:g}, float64)"
    else:
        r = sample(fld.model64, x, solver="rk4", steps=REF_RK4_STEPS, cond=fld.cond)
        desc = f"straightflow `rk4`, {REF_RK4_STEPS} uniform steps, float64"
    fld.ref = r.x
    fld.ref_desc = f"{desc}: {r.nfe} NFE, {time.perf_counter() - t0:.1f} s"


# ============================================================================ straightflow methods
@dataclass
class Method:
    name: str
    library: str  # "straightflow" or the peer's library
    kind: str  # "fixed grid", "BOSS", "search", "peer"
    run: Callable[[Tensor, dict[str, Any] | None, int], tuple[Tensor, int, dict[str, Any]] | None]
    solver: str = ""
    grid: str = ""


def _sf_fixed(fld: Field, solver: str, grid: str) -> Method:

    def run(x, cond, nfe):
        steps = sf_steps_for_nfe(solver, nfe)
        if steps is None:
            return None
        r = sample(fld.model, x, solver=solver, steps=steps, grid=grid, cond=cond)
        return r.x, r.nfe, {"steps": steps}

    return Method(f"{solver} / {grid}", "straightflow", "fixed grid", run, solver, grid)


class _Calibration:
    """Calibration-batch reference + BOSS tables (one per solver) + searched schedules."""

    def __init__(self, fld: Field, fine_steps: int) -> None:

        self.fld = fld
        t0 = time.perf_counter()
        self.ref = reference_trajectory(fld.model, fld.calib, fine_steps, fld.calib_cond)
        self.ref_seconds = time.perf_counter() - t0
        self.tables: dict[str, Any] = {}
        self.table_calls: dict[str, int] = {}
        self.grids: dict[tuple[str, int], Tensor] = {}
        self.schedules: dict[int, Any] = {}
        self.seconds = self.ref_seconds

    def boss(self, solver: str, nfe: int) -> Tensor | None:

        steps = sf_steps_for_nfe(solver, nfe)
        if steps is None:
            return None
        if (solver, steps) in self.grids:
            return self.grids[(solver, steps)]
        if solver not in self.tables:
            t0 = time.perf_counter()
            nc = None if solver == "euler" else self.fld.n_candidates
            C, idx, calls = boss_cost_table(self.fld.model, self.ref, solver, nc, cond=self.fld.calib_cond)
            self.tables[solver] = (C, idx)
            self.table_calls[solver] = calls
            self.seconds += time.perf_counter() - t0
        C, idx = self.tables[solver]
        if steps > len(idx) - 1:
            return None
        nodes, _ = bellman_path(C, steps)
        g = self.ref.times[[idx[k] for k in nodes]].clone()
        self.grids[(solver, steps)] = g
        return g

    def schedule(self, nfe: int, candidates: Sequence[str]):

        if nfe not in self.schedules:
            t0 = time.perf_counter()
            hold = (min(2, self.fld.calib.shape[0]), *self.fld.calib.shape[1:])
            hcond = None
            if self.fld.calib_cond:
                hcond = {k: v[:hold[0]] for k, v in self.fld.calib_cond.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.schedules[nfe] = search_schedule(
                    self.fld.model, self.fld.calib, nfe, candidates=candidates, grids=("uniform", "boss"),
                    holdout=_noise(hold, 7, self.fld.dtype), holdout_cond=hcond, cond=self.fld.calib_cond,
                    reference=self.ref)
            self.seconds += time.perf_counter() - t0
        return self.schedules[nfe]


def _sf_boss(fld: Field, cal: _Calibration, solver: str) -> Method:

    def run(x, cond, nfe):
        g = cal.boss(solver, nfe)
        if g is None:
            return None
        r = sample(fld.model, x, solver=solver, grid=g, cond=cond)
        return r.x, r.nfe, {"steps": g.numel() - 1, "grid": g.tolist()}

    return Method(f"{solver} / BOSS", "straightflow", "BOSS", run, solver, "boss")


def _sf_search(fld: Field, cal: _Calibration, candidates: Sequence[str], max_nfe: int) -> Method:

    def run(x, cond, nfe):
        if nfe > max_nfe:
            return None
        s = cal.schedule(nfe, candidates)
        r = run_schedule(fld.model, x, s.times, s.solvers, cond=cond)
        return r.x, r.nfe, {"steps": len(s.solvers), "schedule": _compact(s.solvers), "solvers": list(s.solvers),
                            "search_grid": s.grid, "grid": s.times.tolist()}

    return Method("searched schedule", "straightflow", "search", run, "+".join(candidates), "search")


def _compact(names: Sequence[str]) -> str:
    """``["heun", "heun", "euler"]`` -> ``"heun*2 euler"``."""
    runs: list[list[Any]] = []
    for nm in names:
        if runs and runs[-1][0] == nm:
            runs[-1][1] += 1
        else:
            runs.append([nm, 1])
    return " ".join(nm if k == 1 else f"{nm}*{k}" for nm, k in runs)


def _peer_method(p: Peer, fld: Field) -> Method:
    def run(x, cond, nfe):
        steps = p.steps_for(nfe)
        if steps is None:
            return None
        c = CountedVelocity(fld.model, cond, check_finite=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = p.run(c, x.clone(), steps)
        return y, c.nfe, {"steps": steps}

    return Method(p.name, p.library, "peer", run)


# ============================================================================ one field
def _bench_field(fld: Field, nfes: Sequence[int], peers: list[Peer], peer_info: dict[str, Any], quick: bool,
                 progress: bool, search_max_nfe: int, fine_steps: int, seed: int = 0,
                 cal_kinds: Sequence[str] = scal.CAL_KINDS, cal_rtol: float | None = None) -> dict[str, Any]:

    t_field = time.perf_counter()
    _reference(fld, QUICK_REF_RTOL if quick else (REF_RTOL if fld.dtype == torch.float64 else REF_RTOL_TRAINED))
    _log(f"{fld.name}: reference {fld.ref_desc}", progress)
    cal = _Calibration(fld, fine_steps)
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
        methods.append(_sf_fixed(fld, s, "uniform"))
        steps = sf_steps_for_nfe(s, probe)
        if steps is None:
            continue
        errs = {}
        for g in ["uniform"] + extra_grids:
            try:
                r = sample(fld.model, fld.calib, solver=s, steps=steps, grid=g, cond=fld.calib_cond)
                errs[g] = _rmse(r.x, cal.ref.end)
            except Exception as e:
                errs[g] = float("nan")
                failures.append(f"{s} / {g} (grid probe): {type(e).__name__}: {e}")
        grid_choice[s] = errs
        for g in extra_grids:
            if math.isfinite(errs.get(g, math.nan)) and errs[g] < errs.get("uniform", math.inf):
                methods.append(_sf_fixed(fld, s, g))
    for s in fixed if fld.evals_per_call == 1 else ():  # guided field: no BOSS (cost; the unguided fields have it)
        methods.append(_sf_boss(fld, cal, s))
    cands = [c for c in SEARCH_CANDIDATES if c in fixed]
    if cands and fld.evals_per_call == 1:  # the search's budget counts model calls, not guided evaluations
        methods.append(_sf_search(fld, cal, cands, search_max_nfe))
    methods += [_peer_method(p, fld) for p in peers]

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
            err = _rmse(x, fld.ref)
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
                rows.append({"method": f"straightflow {s}", "tol": tol, "nfe": r.nfe, "rmse": _rmse(r.x, fld.ref)})
            except Exception as e:
                failures.append(f"{s} tol {tol}: {type(e).__name__}: {e}")
    td = (peer_info.get("torchdiffeq") or {}).get("adaptive")
    if td is not None:
        for tol in tols:
            c = CountedVelocity(fld.model, fld.cond, check_finite=False)
            try:
                y = td(c, fld.noise.clone(), tol)
                rows.append({"method": "torchdiffeq dopri5", "tol": tol, "nfe": c.nfe, "rmse": _rmse(y, fld.ref)})
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
                        errs[s] = _rmse(v[key](c, fld.noise.clone(), s), fld.ref)
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
    x = _noise((n_metric, *shape), seed + 2, fld.dtype)
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
    x0 = _noise((B, D), seed, torch.float32)

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


# ============================================================================ output
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


def _summary(fields_out: dict[str, Any], nfes: Sequence[int]) -> list[dict[str, Any]]:
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


def _cal_summary(fields_out: dict[str, Any], nfes: Sequence[int]) -> dict[str, Any]:
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


def _plot(path: Path, fname: str, fo: dict[str, Any]) -> None:
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


def _plot_summary(path: Path, cs: dict[str, Any]) -> bool:
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


def _markdown(meta: dict[str, Any], fields_out: dict[str, Any], summary, overhead, nfes, cal_summary=None) -> str:
    L: list[str] = ["# Solver accuracy at equal NFE: straightflow vs peers", ""]
    L += [f"Machine: {meta['machine']}; {meta['cpus']} logical CPUs; torch.set_num_threads({meta['threads']}). "
          f"Date: {meta['date']}.{meta['load']}", "",
          f"Command: `{meta['command']}`" + (" (quick mode: tiny sizes, numbers not meaningful)" if meta["quick"] else ""), "",
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
    return "\n".join(L) + "\n"


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
    every field (default: per field, see ``_SIZES``). ``runs``: ``{"2d": run_dir, "digits":
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
               "runs": dict(runs or {}), "version": _FIELD_CACHE_VERSION}
        for fname in fields:
            cache = out / "fields" / f"{fname}.json"
            if reuse_fields and cache.is_file():
                saved = json.loads(cache.read_text())
                if saved.get("key") == json.loads(json.dumps(key)):
                    fields_out[fname] = saved["field"]
                    notes.append(f"field {fname}: measured by an earlier run with the same settings and read back "
                                 f"from `fields/{fname}.json`" + (f" (`{saved['command']}`)" if saved.get("command") else ""))
                    _plot(out / f"solvers-{fname}.png", fname, saved["field"])
                    _log(f"field {fname}: reused {cache}", progress)
                    continue
            _log(f"field {fname}", progress)
            try:
                fld = _make_field(fname, out, runs, quick, seed, n, progress)
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
            _plot(out / f"solvers-{fname}.png", fname, fo)
            _log(f"{fname} done ({fo['seconds']} s)", progress)
        ov = _overhead(peers, quick, seed) if overhead else None
    finally:
        torch.set_num_threads(prev_threads)

    summary = _summary(fields_out, nfes)
    cal_summary = _cal_summary(fields_out, nfes)
    summary_plot = _plot_summary(out / "solvers-summary.png", cal_summary)
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
            "peers_skipped": peers_skipped, "fields_skipped": fields_skipped, "notes": notes,
            "summary_plot": summary_plot, "seed": seed, "peer_notes": {p.name: p.note for p in peers if p.note}, "metric_top": metric_top,
            "torch": torch.__version__, "seconds": time.perf_counter() - t_start}
    md = _markdown(meta, fields_out, summary, ov, nfes, cal_summary)
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
                out[name] = _peer_method(p, fld)
        elif r["kind"] == "fixed grid":
            out[name] = _sf_fixed(fld, r["solver"], r["grid"])
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


def run(a: argparse.Namespace) -> int:
    runs = {k: v for k, v in (("2d", a.run_2d), ("digits", a.run_digits), ("digits-cfg", a.run_digits_cfg),
                              ("mnist", a.run_mnist)) if v}
    kinds = tuple(k for k in a.cal_kinds.split(",") if k and k != "none")
    nfes = [int(v) for v in a.nfes.split(",")] if a.nfes else None
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
