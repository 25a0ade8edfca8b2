"""Optimised sampling schedules: BOSS time grids, per-step solver search, cached calibrations.

Three tools, all driven by one accurate *reference trajectory* computed on a calibration batch:

* :func:`boss_grid` -- Bellman Optimal Step-size Straightening (Nguyen et al. 2023): the time
  grid for a given solver and NFE that minimises the summed one-step (local) error along the
  reference trajectory, found exactly by dynamic programming over a fine candidate set.
* :func:`search_schedule` -- a search over (time grid, per-step solver) under an exact NFE budget
  (in the spirit of S^3 / USF, "A Unified Sampling Framework for Solver Searching"), scored by the
  endpoint RMSE against the reference on the calibration batch and reported on a held-out batch.
  Schedules run with :func:`run_schedule` (true NFE counted).
* :class:`Calibration` + :func:`save_calibration` / :func:`load_calibration` /
  :func:`calibrate` / :func:`calibrated_grid` -- results stored beside a model in
  ``run_dir/calibrations/<kind>-<solver>-nfe<k>.json`` together with a fingerprint of the
  weights, and reused (without a single model evaluation) while the weights are unchanged.

Using a BOSS grid: the grid registry's functions take no model, so pass the grid explicitly::

    g = boss_grid(model, (256, 2), nfe=6, solver="euler")          # float64, steps + 1 times
    out = sf.sample(model, noise, solver="euler", grid=g)            # steps come from the grid

    g = calibrated_grid("runs/x", "euler", nfe=6)                    # computed once, then cached

Conventions: time runs from noise (t = 0) to data (t = 1); RMSE is over all elements,
``sqrt(mean((x - x_ref(1))^2))``; the reference is classic RK4 on ``fine_steps`` uniform steps.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .grids import make_grid, validate_grid
from .io import CheckpointError, load_json, load_tensors, save_json
from .paths import PathLike as PathSpec
from .paths import get_path
from .solvers import SampleResult, get_solver
from .solvers.base import SOLVERS, CountedVelocity, NonFiniteError

__all__ = [
    "ReferenceTrajectory", "reference_trajectory", "boss_cost_table", "bellman_path", "boss_grid",
    "run_schedule", "Schedule", "search_schedule", "Calibration", "model_fingerprint",
    "calibration_path", "save_calibration", "load_calibration", "calibrate", "calibrated_grid",
    "calibrated_schedule", "CALIBRATION_DIR",
]

CALIBRATION_DIR = "calibrations"
MODEL_FILE = "model.safetensors"
_FORMAT_VERSION = 1

NoiseLike = Union[Tensor, Sequence[int]]


# ====================================================================== helpers
def _noise(noise_or_shape: NoiseLike, seed: int) -> Tensor:
    if torch.is_tensor(noise_or_shape):
        if not noise_or_shape.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise_or_shape.dtype}")
        return noise_or_shape
    shape = tuple(int(s) for s in noise_or_shape)
    if len(shape) < 2:
        raise ValueError(f"noise shape must be (batch, *sample_shape), got {shape}")
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def _rmse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _solver_options(spec, path: PathSpec) -> Dict[str, Any]:
    return {"path": get_path(path)} if spec.needs_path else {}


def _check_deterministic(name: str):
    spec = get_solver(name)
    if spec.stochastic:
        raise ValueError(f"solver {spec.name!r} is stochastic; schedules and BOSS need deterministic solvers")
    return spec


def _repeat_cond(cond: Optional[Mapping[str, Any]], batch: int, reps: int) -> Dict[str, Any]:
    """Tile batch-shaped conditioning tensors ``reps`` times along the batch dimension."""
    out = {}
    for k, v in (cond or {}).items():
        if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == batch:
            out[k] = v.repeat(reps, *([1] * (v.ndim - 1)))
        else:
            out[k] = v
    return out


# ====================================================================== reference trajectory
@dataclass
class ReferenceTrajectory:
    """RK4 states ``xs[i] = x_ref(times[i])`` and velocities ``vs[i] = v(xs[i], times[i])``.

    ``nfe`` is what it cost: ``4 * fine_steps + 1`` model calls on the batch (RK4's first stage
    of step ``i`` *is* ``v(x_i, t_i)``; one more call gives the velocity at ``t = 1``).
    :meth:`at` interpolates with the cubic Hermite spline through states and velocities
    (error O(h^4), far below any coarse solver's).
    """

    times: Tensor  # (N + 1,) float64
    xs: Tensor  # (N + 1, B, ...)
    vs: Tensor  # (N + 1, B, ...)
    nfe: int

    @property
    def fine_steps(self) -> int:
        return self.times.numel() - 1

    @property
    def end(self) -> Tensor:
        return self.xs[-1]

    def at(self, t: float) -> Tensor:
        t = float(t)
        ts = self.times
        n = self.fine_steps
        i = int(torch.searchsorted(ts, torch.tensor([t], dtype=ts.dtype), right=True)[0]) - 1
        i = min(max(i, 0), n - 1)
        t0, t1 = float(ts[i]), float(ts[i + 1])
        h = t1 - t0
        s = (t - t0) / h
        if abs(s) < 1e-12:
            return self.xs[i]
        if abs(s - 1) < 1e-12:
            return self.xs[i + 1]
        h00, h10 = 2 * s ** 3 - 3 * s ** 2 + 1, s ** 3 - 2 * s ** 2 + s
        h01, h11 = -2 * s ** 3 + 3 * s ** 2, s ** 3 - s ** 2
        return h00 * self.xs[i] + h10 * h * self.vs[i] + h01 * self.xs[i + 1] + h11 * h * self.vs[i + 1]


@torch.no_grad()
def reference_trajectory(
    model: Callable, x: Tensor, fine_steps: int = 256, cond: Optional[Dict[str, Any]] = None,
    check_finite: bool = True,
) -> ReferenceTrajectory:
    """Integrate ``x`` (noise at t = 0) to t = 1 with RK4 on a uniform fine grid, keeping every
    state and the velocity at every state. Costs ``4 * fine_steps + 1`` model calls."""
    if not isinstance(fine_steps, int) or fine_steps < 1:
        raise ValueError(f"fine_steps must be an int >= 1, got {fine_steps!r}")
    f = CountedVelocity(model, cond, check_finite=check_finite)
    ts = torch.linspace(0.0, 1.0, fine_steps + 1, dtype=torch.float64)
    tl = ts.tolist()
    xs, vs = [x], []
    for i in range(fine_steps):
        t, h = tl[i], tl[i + 1] - tl[i]
        k1 = f(x, t, i)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h, i)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h, i)
        k4 = f(x + h * k3, tl[i + 1], i)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        vs.append(k1)
        xs.append(x)
    vs.append(f(x, tl[-1], fine_steps))
    return ReferenceTrajectory(ts, torch.stack(xs), torch.stack(vs), f.nfe)


@torch.no_grad()
def _reference_end(model, x, fine_steps, cond, check_finite=True) -> Tuple[Tensor, int]:
    f = CountedVelocity(model, cond, check_finite=check_finite)
    ts = torch.linspace(0.0, 1.0, fine_steps + 1, dtype=torch.float64).tolist()
    out = get_solver("rk4").fn(f, x, ts)
    return out, f.nfe


# ====================================================================== BOSS
def _candidate_indices(fine_steps: int, n_candidates: Optional[int]) -> List[int]:
    if n_candidates is None or n_candidates >= fine_steps:
        return list(range(fine_steps + 1))
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    idx = torch.linspace(0, fine_steps, n_candidates + 1, dtype=torch.float64).round().long().tolist()
    return sorted(set(int(i) for i in idx))


class _RowTimeVelocity:
    """``f(x, t, i)`` for solver functions run on stacked (pair, sample) rows with per-row times.

    ``t`` is a float or a tensor broadcastable to ``x`` with one value per row; the model receives
    a ``(R,)`` time vector. Counts model calls in ``calls``.
    """

    def __init__(self, model, cond, check_finite=True):
        self.model, self.cond, self.check_finite, self.calls = model, cond, check_finite, 0

    def __call__(self, x, t, i=-1):
        R = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tb = t.expand(R) if t.numel() == 1 else t.reshape(R)
        v = self.model(x, tb, **self.cond)
        self.calls += 1
        if v.shape != x.shape:
            raise ValueError(f"velocity model returned shape {tuple(v.shape)} for input {tuple(x.shape)}")
        if self.check_finite and not bool(torch.isfinite(v).all()):
            raise NonFiniteError("velocity became NaN/Inf during BOSS calibration")
        return v


@torch.no_grad()
def boss_cost_table(
    model: Callable, ref: ReferenceTrajectory, solver: str = "euler", n_candidates: Optional[int] = None,
    cond: Optional[Dict[str, Any]] = None, path: PathSpec = "linear", max_rows: int = 1 << 16,
) -> Tuple[Tensor, List[int], int]:
    """Local-error table ``C[a, b]`` between candidate fine-grid indices ``idx[a] < idx[b]``.

    ``C[a, b] = mean_{batch, elements} (x_ref(t_j) - Phi_solver(x_ref(t_i); t_i -> t_j))^2`` with
    ``i = idx[a], j = idx[b]`` and ``Phi`` one step of the solver; ``C = inf`` where ``a >= b``.
    For Euler ``Phi = x_ref(t_i) + (t_j - t_i) v(x_ref(t_i), t_i)`` uses the stored reference
    velocities (no model calls; ``n_candidates=None`` = all ``fine_steps + 1`` points). Other solvers
    need fresh calls: every pair is one step from a reference state, evaluated with all pairs
    stacked along the batch (chunks of at most ``max_rows`` rows), so the table costs
    ``evals_per_step * ceil(pairs * B / max_rows)`` batched calls (+ ``evals_per_step`` calls once
    to check the stacked step against a scalar-time step; solvers that need scalar times fall
    back to one solve per pair); ``n_candidates`` defaults to 32 intervals for them. A multistep
    solver contributes its (one-step) starting method.
    Returns ``(C, idx, model_calls)``.
    """
    spec = _check_deterministic(solver)
    n = ref.fine_steps
    if n_candidates is None and spec.name != "euler":
        n_candidates = 32
    idx = _candidate_indices(n, n_candidates)
    M = len(idx)
    ts = ref.times[idx]
    X = ref.xs[idx]
    C = torch.full((M, M), math.inf, dtype=torch.float64)
    B = X.shape[1]
    if spec.name == "euler":
        V = ref.vs[idx]
        bshape = (-1,) + (1,) * (X.ndim - 1)
        for a in range(M - 1):
            dt = (ts[a + 1:] - ts[a]).to(X.dtype).reshape(bshape)
            err = X[a + 1:] - X[a] - dt * V[a]
            C[a, a + 1:] = err.double().pow(2).flatten(1).mean(1)
        return C, idx, 0

    pairs = [(a, b) for a in range(M - 1) for b in range(a + 1, M)]
    per_chunk = max(1, max_rows // max(B, 1))
    opts = _solver_options(spec, path)
    calls = 0
    batched, checked = True, False
    for c0 in range(0, len(pairs), per_chunk):
        chunk = pairs[c0:c0 + per_chunk]
        P = len(chunk)
        a_idx = torch.tensor([p[0] for p in chunk])
        b_idx = torch.tensor([p[1] for p in chunk])
        x0 = X[a_idx].reshape(P * B, *X.shape[2:])
        target = X[b_idx].reshape(P * B, *X.shape[2:])
        rshape = (P * B,) + (1,) * (X.ndim - 2)
        T0 = ts[a_idx].repeat_interleave(B).to(X.dtype).reshape(rshape)
        T1 = ts[b_idx].repeat_interleave(B).to(X.dtype).reshape(rshape)
        f = _RowTimeVelocity(model, _repeat_cond(cond, B, P))
        out = None
        if batched:
            try:
                out = spec.fn(f, x0, [T0, T1], **opts)
            except NonFiniteError:
                raise
            except Exception:  # the solver needs scalar times
                batched = False
            calls += f.calls
            if out is not None and not checked:  # once: the stacked step equals a scalar-time step
                a, b = chunk[0]
                g = CountedVelocity(model, cond)
                one = spec.fn(g, X[a], [float(ts[a]), float(ts[b])], **opts)
                calls += g.nfe
                checked = True
                if not torch.allclose(one, out[:B], rtol=1e-6, atol=1e-9 * (1 + float(one.abs().max()))):
                    batched, out = False, None
        if out is None:  # fall back to one solve per pair
            outs = []
            for a, b in chunk:
                g = CountedVelocity(model, cond)
                outs.append(spec.fn(g, X[a], [float(ts[a]), float(ts[b])], **opts))
                calls += g.nfe
            out = torch.cat(outs)
        err = (out - target).double().pow(2).reshape(P, -1).mean(1)
        C[a_idx, b_idx] = err
    return C, idx, calls


def bellman_path(cost: Tensor, steps: int) -> Tuple[List[int], float]:
    """Exact minimum of ``sum_k cost[n_{k-1}, n_k]`` over paths ``0 = n_0 < n_1 < ... < n_steps = M-1``.

    Bellman recursion ``D_k(j) = min_{i < j} D_{k-1}(i) + cost[i, j]``, ``D_0 = [0, inf, ...]``,
    answer ``D_steps(M - 1)``; O(M^2 steps) time. ``cost`` is (M, M) with ``inf`` where ``i >= j``.
    Returns the node indices (``steps + 1`` of them) and the optimal total cost.
    """
    C = torch.as_tensor(cost, dtype=torch.float64)
    M = C.shape[0]
    if C.ndim != 2 or C.shape[1] != M:
        raise ValueError(f"cost must be square, got {tuple(C.shape)}")
    if not isinstance(steps, int) or steps < 1 or steps > M - 1:
        raise ValueError(f"steps must be an int in [1, {M - 1}] for {M} candidate times, got {steps!r}")
    C = C.masked_fill(~torch.ones(M, M, dtype=torch.bool).triu(1), math.inf)
    D = torch.full((M,), math.inf, dtype=torch.float64)
    D[0] = 0.0
    back = []
    for _ in range(steps):
        total = D[:, None] + C  # (i, j)
        D, arg = total.min(0)
        back.append(arg)
    path = [M - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    path.reverse()
    return path, float(D[M - 1])


@torch.no_grad()
def boss_grid(
    model: Callable,
    noise_or_shape: NoiseLike,
    nfe: int,
    solver: str = "euler",
    fine_steps: int = 256,
    cond: Optional[Dict[str, Any]] = None,
    path: PathSpec = "linear",
    seed: int = 0,
    n_candidates: Optional[int] = None,
    reference: Optional[ReferenceTrajectory] = None,
    return_info: bool = False,
):
    """BOSS time grid (Nguyen et al. 2023) for ``solver`` at ``nfe`` evaluations per sample.

    With ``steps = get_solver(solver).steps_for_nfe(nfe)`` and a reference trajectory ``x_ref``
    (RK4, ``fine_steps`` uniform steps, on the calibration batch ``noise_or_shape``; a shape is
    drawn with ``seed``), the grid is the solution of

        min over 0 = t_{n_0} < t_{n_1} < ... < t_{n_steps} = 1 (n_k fine/candidate indices) of
            sum_k  E_batch mean_elements || x_ref(t_{n_k}) - Phi(x_ref(t_{n_{k-1}}); t_{n_{k-1}} -> t_{n_k}) ||^2

    where ``Phi`` is one step of the solver (Euler: ``x + (t_j - t_i) v(x, t_i)``), solved exactly
    by :func:`bellman_path`, O(M^2 steps) for M candidate intervals.

    Calibration cost (model calls on the calibration batch): the reference, ``4 fine_steps + 1``;
    the Euler cost table reuses the reference's velocities (all ``fine_steps + 1`` points are
    candidates, no more calls); other solvers restrict to ``n_candidates`` (default 32) uniformly
    spaced fine points and cost ``evals_per_step`` calls per chunk of stacked pairs (see
    :func:`boss_cost_table`). ``reference`` reuses a :func:`reference_trajectory` (then
    ``noise_or_shape`` is ignored). Returns the float64 grid (``steps + 1`` times, 0 and 1
    included), or ``(grid, info)`` with ``return_info=True`` (``info["calibration_nfe"]``).
    """
    spec = _check_deterministic(solver)
    steps = spec.steps_for_nfe(int(nfe))
    if reference is None:
        x = _noise(noise_or_shape, seed)
        reference = reference_trajectory(model, x, fine_steps, cond)
    C, idx, calls = boss_cost_table(model, reference, spec.name, n_candidates, cond=cond, path=path)
    if steps > len(idx) - 1:
        raise ValueError(
            f"{steps} steps need at least as many candidate intervals; got {len(idx) - 1} "
            "(raise fine_steps or n_candidates)")
    nodes, cost = bellman_path(C, steps)
    grid = validate_grid(reference.times[[idx[k] for k in nodes]].clone(), direction=1)
    if not return_info:
        return grid
    return grid, {"solver": spec.name, "steps": steps, "local_cost": cost, "candidates": len(idx) - 1,
                  "fine_steps": reference.fine_steps, "calibration_nfe": reference.nfe + calls,
                  "reference_nfe": reference.nfe, "table_calls": calls}


# ====================================================================== schedules
def run_schedule(
    model: Callable,
    x: Tensor,
    times: Union[Tensor, Sequence[float]],
    solvers: Union[str, Sequence[str]],
    cond: Optional[Dict[str, Any]] = None,
    path: PathSpec = "linear",
    return_trajectory: bool = False,
    check_finite: bool = True,
) -> SampleResult:
    """Integrate ``x`` along ``times`` taking step ``k`` (``times[k] -> times[k+1]``) with ``solvers[k]``.

    Consecutive steps with the same solver run as one call of that solver on the sub-grid, so a
    homogeneous schedule is exactly ``solve(model, x, times, solver)`` (multistep solvers keep
    their history within a run of equal names and restart it at a change). ``.nfe`` is the true
    number of model evaluations (counted).
    """
    g = validate_grid(times)
    n = g.numel() - 1
    names = [solvers] * n if isinstance(solvers, str) else list(solvers)
    if len(names) != n:
        raise ValueError(f"schedule has {len(names)} solvers for {n} steps")
    specs = [_check_deterministic(s) for s in names]
    f = CountedVelocity(model, cond, check_finite=check_finite)
    ts = g.tolist()
    traj = [x] if return_trajectory else None
    k = 0
    while k < n:
        e = k + 1
        while e < n and specs[e].name == specs[k].name:
            e += 1
        spec = specs[k]
        cb = (lambda i, t, xi: traj.append(xi)) if return_trajectory else None
        x = spec.fn(f, x, ts[k:e + 1], callback=cb, **_solver_options(spec, path))
        k = e
    if check_finite and not bool(torch.isfinite(x).all()):
        raise NonFiniteError("schedule produced NaN/Inf in its final state")
    return SampleResult(
        x=x, nfe=f.nfe, times=g, trajectory=torch.stack(traj) if traj is not None else None,
        info={"solver": "schedule", "steps": n, "schedule": [s.name for s in specs]},
    )


@dataclass
class Schedule:
    """A searched schedule: grid times, one solver per step, its true NFE and its scores."""

    grid: str
    times: Tensor
    solvers: List[str]
    nfe: int
    calib_rmse: float
    holdout_rmse: Optional[float] = None
    best_single: Optional[Dict[str, Any]] = None  # best homogeneous candidate (name, grid, rmse)
    candidates_scored: int = 0
    calibration_nfe: int = 0

    def run(self, model, x, cond=None, **kw) -> SampleResult:
        return run_schedule(model, x, self.times, self.solvers, cond=cond, **kw)


def _grid_for(name: str, steps: int, boss_tables: Dict[str, Tuple[Tensor, List[int]]],
              ref: ReferenceTrajectory, table_fn: Callable[[str], Tuple[Tensor, List[int]]]) -> Optional[Tensor]:
    """Times for grid ``name`` with ``steps`` steps: a registered grid name, ``"boss"`` (Euler
    cost) or ``"boss-<solver>"`` (that solver's one-step cost); None when infeasible."""
    low = name.lower()
    if low == "boss" or low.startswith("boss-") or low.startswith("boss:"):
        solver = "euler" if low == "boss" else name[5:]
        key = get_solver(solver).name
        if key not in boss_tables:
            boss_tables[key] = table_fn(key)
        C, idx = boss_tables[key]
        if steps > len(idx) - 1:
            return None
        nodes, _ = bellman_path(C, steps)
        return ref.times[[idx[k] for k in nodes]].clone()
    return make_grid(name, steps)


@torch.no_grad()
def search_schedule(
    model: Callable,
    noise_or_shape: NoiseLike,
    nfe: int,
    candidates: Sequence[str] = ("euler", "midpoint", "heun"),
    grids: Sequence[str] = ("uniform", "boss"),
    holdout: Optional[NoiseLike] = None,
    fine_steps: int = 256,
    beam: int = 4,
    rescore: int = 4,
    cond: Optional[Dict[str, Any]] = None,
    holdout_cond: Optional[Dict[str, Any]] = None,
    path: PathSpec = "linear",
    seed: int = 0,
    reference: Optional[ReferenceTrajectory] = None,
) -> Schedule:
    """Search (grid, per-step solver) under the budget ``nfe`` for the lowest endpoint RMSE.

    Budgeted beam search, for every grid in ``grids`` (registered names, ``"boss"`` = Euler-BOSS,
    ``"boss-<solver>"``) and every feasible step count ``K`` (``ceil(nfe / max cost)`` to
    ``nfe // min cost``, cost = ``evals_per_step``): walk the K steps of that grid keeping, for
    every NFE spent so far, the ``beam`` partial schedules whose state is closest (RMSE) to the
    reference at the current time; a solver is only tried at step k if the rest of the steps can
    still be paid with the cheapest candidate, so no schedule exceeds ``nfe``. The ``rescore``
    best finished schedules of each (grid, K), and every homogeneous schedule (one candidate on
    one grid with ``steps_for_nfe(nfe)`` steps: the single-solver baselines), are re-run with
    :func:`run_schedule` on the calibration batch (true NFE counted; multistep solvers run with
    their history), and the lowest endpoint RMSE wins (ties: fewer NFE). Since the baselines are
    in the pool, the result is never worse than the best single solver on the calibration batch.
    The winner is then scored on the held-out batch ``holdout`` (a tensor or shape; default: a
    batch like the calibration one drawn with ``seed + 1``) against its own RK4 reference.

    Calibration cost: ``4 fine_steps + 1`` calls for the reference (+ BOSS tables for
    ``boss-<solver>`` grids), the beam (each step runs each solver once on all beam states
    stacked), ``4 fine_steps`` + the schedule's NFE on the held-out batch.
    """
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    specs = []
    for c in candidates:
        s = _check_deterministic(c)
        if s.name not in [p.name for p in specs]:
            specs.append(s)
    if not specs:
        raise ValueError("need at least one candidate solver")
    cost = {s.name: s.nfe(1) for s in specs}
    cmin, cmax = min(cost.values()), max(cost.values())
    if cmin > nfe:
        raise ValueError(f"no candidate fits in nfe={nfe} (cheapest step costs {cmin})")
    x = _noise(noise_or_shape, seed)
    if reference is None:
        reference = reference_trajectory(model, x, fine_steps, cond)
    else:
        x = reference.xs[0]
    ref = reference
    B = x.shape[0]
    extra_calls = 0
    boss_tables: Dict[str, Tuple[Tensor, List[int]]] = {}

    def table_fn(solver):
        nonlocal extra_calls
        C, idx, calls = boss_cost_table(model, ref, solver, cond=cond, path=path)
        extra_calls += calls
        return C, idx

    pool: Dict[Tuple[str, Tuple[float, ...], Tuple[str, ...]], Tuple[str, Tensor, List[str]]] = {}

    def add(gname, times, sched):
        pool.setdefault((gname, tuple(times.tolist()), tuple(sched)), (gname, times, list(sched)))

    singles = []
    for gname in grids:
        for s in specs:
            K = s.steps_for_nfe(nfe)
            times = _grid_for(gname, K, boss_tables, ref, table_fn)
            if times is not None and s.nfe(K) <= nfe:
                add(gname, times, [s.name] * K)
                singles.append((gname, times, [s.name] * K))
        for K in range(max(1, -(-nfe // cmax)), nfe // cmin + 1):
            times = _grid_for(gname, K, boss_tables, ref, table_fn)
            if times is None:
                continue
            tl = times.tolist()
            # states: list of (used, sched, x, err)
            states = [(0, [], x, 0.0)]
            for k in range(K):
                target = ref.at(tl[k + 1])
                new = []
                for s in specs:
                    c = cost[s.name]
                    ok = [st for st in states if st[0] + c + (K - k - 1) * cmin <= nfe]
                    if not ok:
                        continue
                    xs = torch.cat([st[2] for st in ok])
                    fv = _RowTimeVelocity(model, _repeat_cond(cond, B, len(ok)))
                    out = s.fn(fv, xs, tl[k:k + 2], **_solver_options(s, path))
                    extra_calls += fv.calls
                    for r, st in enumerate(ok):
                        xr = out[r * B:(r + 1) * B]
                        new.append((st[0] + c, st[1] + [s.name], xr, _rmse(xr, target)))
                buckets: Dict[int, list] = {}
                for st in new:
                    buckets.setdefault(st[0], []).append(st)
                states = [st for b in buckets.values() for st in sorted(b, key=lambda z: z[3])[:beam]]
            for st in sorted(states, key=lambda z: z[3])[:rescore]:
                add(gname, times, st[1])

    best = None
    best_single = None
    single_keys = {(g, tuple(t.tolist()), tuple(sc)) for g, t, sc in singles}
    for key, (gname, times, sched) in pool.items():
        res = run_schedule(model, x, times, sched, cond=cond, path=path)
        extra_calls += res.nfe
        if res.nfe > nfe:  # a solver whose true cost exceeds its declared cost: drop it
            continue
        err = _rmse(res.x, ref.end)
        item = (err, res.nfe, gname, times, sched)
        if best is None or (err, res.nfe) < (best[0], best[1]):
            best = item
        if key in single_keys and (best_single is None or (err, res.nfe) < (best_single[0], best_single[1])):
            best_single = item
    if best is None:
        raise RuntimeError(f"no schedule fits in nfe={nfe}")

    xh = _noise(holdout, seed + 1) if holdout is not None else _noise(tuple(x.shape), seed + 1)
    hcond = holdout_cond if holdout_cond is not None else (cond if holdout is None else None)
    href, hcalls = _reference_end(model, xh, ref.fine_steps, hcond)
    extra_calls += hcalls

    def holdout_rmse(times, sched):
        r = run_schedule(model, xh, times, sched, cond=hcond, path=path)
        return _rmse(r.x, href), r.nfe

    h_best, _ = holdout_rmse(best[3], best[4])
    bs = None
    if best_single is not None:
        h_single, n_single = holdout_rmse(best_single[3], best_single[4])
        bs = {"solver": best_single[4][0], "grid": best_single[2], "nfe": best_single[1],
              "calib_rmse": best_single[0], "holdout_rmse": h_single}
        extra_calls += n_single
    return Schedule(
        grid=best[2], times=best[3], solvers=list(best[4]), nfe=best[1], calib_rmse=best[0],
        holdout_rmse=h_best, best_single=bs, candidates_scored=len(pool),
        calibration_nfe=ref.nfe + extra_calls + best[1],
    )


# ====================================================================== calibrations on disk
@dataclass
class Calibration:
    """A stored optimised schedule: what it is for, the grid, the per-step solvers and its scores.

    ``kind``: ``"boss"`` (a BOSS grid for one solver) or ``"search"`` (a searched schedule;
    ``solver`` is then the ``+``-joined candidate list). ``times`` has ``len(solvers) + 1``
    entries. ``fingerprint`` identifies the weights it was computed for (:func:`model_fingerprint`).
    """

    kind: str
    solver: str
    nfe: int
    times: List[float]
    solvers: List[str]
    grid: str = ""
    calib_rmse: Optional[float] = None
    holdout_rmse: Optional[float] = None
    reference: Dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    created: str = ""
    info: Dict[str, Any] = field(default_factory=dict)
    version: int = _FORMAT_VERSION

    @property
    def grid_tensor(self) -> Tensor:
        return validate_grid(torch.tensor(self.times, dtype=torch.float64), direction=1)

    @property
    def steps(self) -> int:
        return len(self.solvers)

    def run(self, model, x, cond=None, **kw) -> SampleResult:
        """Sample with this calibration (:func:`run_schedule`)."""
        return run_schedule(model, x, self.grid_tensor, self.solvers, cond=cond, **kw)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        if not isinstance(d, Mapping):
            raise ValueError(f"a calibration must be a JSON object, got {type(d).__name__}")
        names = set(cls.__dataclass_fields__)
        missing = {"kind", "solver", "nfe", "times", "solvers"} - set(d)
        if missing:
            raise ValueError(f"calibration lacks {sorted(missing)}")
        cal = cls(**{k: v for k, v in d.items() if k in names})
        if len(cal.times) != len(cal.solvers) + 1:
            raise ValueError(f"calibration has {len(cal.times)} times for {len(cal.solvers)} steps")
        cal.grid_tensor  # validates
        return cal


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


def _canon_solver(kind: str, solver: Union[str, Sequence[str]]) -> str:
    if isinstance(solver, str):
        parts = solver.split("+") if kind == "search" else [solver]
    else:
        parts = list(solver)
    return "+".join(SOLVERS.canonical(p) if p in SOLVERS else p for p in parts)


def calibration_path(run_dir: Union[str, os.PathLike], kind: str, solver: Union[str, Sequence[str]], nfe: int) -> Path:
    """``run_dir/calibrations/<kind>-<solver>-nfe<k>.json`` (solver names canonicalised)."""
    return Path(run_dir) / CALIBRATION_DIR / f"{_sanitize(kind)}-{_sanitize(_canon_solver(kind, solver))}-nfe{int(nfe)}.json"


def _hash_state(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def model_fingerprint(model_or_run_dir: Any) -> str:
    """Identify a model's weights: SHA-256 over the sorted (name, dtype, shape, bytes) of its
    state dict. A run directory is fingerprinted from its ``model.safetensors`` the same way, so a
    model loaded from the run and the run directory itself agree. Objects with a
    ``fingerprint()`` method use it; the Gaussian-mixture oracle hashes its parameters and path."""
    if isinstance(model_or_run_dir, (str, os.PathLike)):
        return _hash_state(load_tensors(Path(model_or_run_dir) / MODEL_FILE))
    m = model_or_run_dir
    fp = getattr(m, "fingerprint", None)
    if callable(fp):
        return str(fp())
    if hasattr(m, "state_dict") and callable(m.state_dict):
        from .checkpoint import unwrap

        inner = unwrap(m) if isinstance(m, torch.nn.Module) else m
        return _hash_state(inner.state_dict())
    if all(hasattr(m, a) for a in ("means", "covs", "weights", "path")):  # GaussianMixtureFlow
        state = {"means": m.means, "covs": m.covs, "weights": m.weights}
        cfg = m.path.config() if hasattr(m.path, "config") else repr(m.path)
        return _hash_state(state) + "|path=" + hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]
    raise TypeError(f"cannot fingerprint a {type(m).__name__}: give an nn.Module, a run directory, "
                    "or an object with a fingerprint() method")


def save_calibration(run_dir: Union[str, os.PathLike], cal: Calibration) -> Path:
    """Write ``cal`` to :func:`calibration_path` atomically; returns the path."""
    p = calibration_path(run_dir, cal.kind, cal.solver, cal.nfe)
    save_json(p, cal.to_dict())
    return p


def load_calibration(
    run_dir: Union[str, os.PathLike], kind: str, solver: Union[str, Sequence[str]], nfe: int,
    fingerprint: Optional[str] = None, model: Any = None,
) -> Optional[Calibration]:
    """The stored calibration, or None when there is none, it is unreadable, or its fingerprint
    does not match the weights: ``fingerprint`` if given, else ``model``'s, else the run's
    ``model.safetensors`` (None when none of these exists: an unverifiable file is not reused)."""
    p = calibration_path(run_dir, kind, solver, nfe)
    if not p.is_file():
        return None
    try:
        cal = Calibration.from_dict(load_json(p))
    except (CheckpointError, ValueError, TypeError) as e:
        warnings.warn(f"ignoring unreadable calibration {p}: {e}")
        return None
    if fingerprint is None:
        if model is not None:
            fingerprint = model_fingerprint(model)
        elif (Path(run_dir) / MODEL_FILE).is_file():
            fingerprint = model_fingerprint(run_dir)
        else:
            return None
    return cal if cal.fingerprint == fingerprint else None


def _default_shape(model, batch: int) -> Tuple[int, ...]:
    shape = getattr(model, "sample_shape", None)
    if shape is None and hasattr(model, "dim") and isinstance(getattr(model, "dim"), int):
        shape = (model.dim,)
    if shape is None:
        raise ValueError("give noise_or_shape (the model has no sample_shape)")
    return (batch, *tuple(shape))


@torch.no_grad()
def calibrate(
    run_dir_or_model: Any,
    kind: str,
    solver: Union[str, Sequence[str]],
    nfe: int,
    noise_or_shape: Optional[NoiseLike] = None,
    *,
    run_dir: Optional[Union[str, os.PathLike]] = None,
    cond: Optional[Dict[str, Any]] = None,
    holdout: Optional[NoiseLike] = None,
    holdout_cond: Optional[Dict[str, Any]] = None,
    fine_steps: int = 256,
    path: PathSpec = "linear",
    seed: int = 0,
    batch: int = 256,
    recompute: bool = False,
    save: bool = True,
    **options,
) -> Calibration:
    """Load the calibration for (kind, solver, nfe) beside the model, or compute and save it.

    ``run_dir_or_model`` is a run directory (the model is loaded from it only if a computation is
    needed) or a model (then ``run_dir=`` says where to cache; without it nothing is cached).
    ``kind="boss"``: :func:`boss_grid` for ``solver``; ``kind="search"``: :func:`search_schedule`
    with ``candidates=solver`` (a sequence, or a ``+``-joined string; ``grids=`` etc. in
    ``options``). A stored file is reused, with no model evaluation, when its weights fingerprint
    matches; a mismatch (retrained weights) recomputes and overwrites it.
    """
    if kind not in ("boss", "search"):
        raise ValueError(f"kind must be 'boss' or 'search', got {kind!r}")
    if isinstance(run_dir_or_model, (str, os.PathLike)):
        run_dir = Path(run_dir_or_model)
        model = None
        fp = model_fingerprint(run_dir)
    else:
        model = run_dir_or_model
        fp = model_fingerprint(model)
    label = _canon_solver(kind, solver)
    if run_dir is not None and not recompute:
        cal = load_calibration(run_dir, kind, label, nfe, fingerprint=fp)
        if cal is not None:
            return cal
    if model is None:
        from .checkpoint import load as load_run

        model = load_run(run_dir)
    x = _noise(noise_or_shape if noise_or_shape is not None else _default_shape(model, batch), seed)
    ref = reference_trajectory(model, x, fine_steps, cond)
    settings = {"solver": "rk4", "fine_steps": fine_steps, "calib_batch": int(x.shape[0]),
                "seed": seed, "path": str(get_path(path).config())}
    if kind == "boss":
        spec = _check_deterministic(label)
        grid, info = boss_grid(model, x, nfe, spec.name, cond=cond, path=path, reference=ref,
                               return_info=True, **options)
        steps = grid.numel() - 1
        r = run_schedule(model, x, grid, spec.name, cond=cond, path=path)
        xh = _noise(holdout, seed + 1) if holdout is not None else _noise(tuple(x.shape), seed + 1)
        hcond = holdout_cond if holdout_cond is not None else (cond if holdout is None else None)
        href, hcalls = _reference_end(model, xh, fine_steps, hcond)
        rh = run_schedule(model, xh, grid, spec.name, cond=hcond, path=path)
        settings.update(holdout_batch=int(xh.shape[0]), calibration_nfe=info["calibration_nfe"] + r.nfe,
                        holdout_nfe=hcalls + rh.nfe, candidates=info["candidates"])
        cal = Calibration(kind="boss", solver=spec.name, nfe=r.nfe, times=grid.tolist(), solvers=[spec.name] * steps,
                          grid="boss", calib_rmse=_rmse(r.x, ref.end), holdout_rmse=_rmse(rh.x, href),
                          info={"local_cost": info["local_cost"], "true_nfe": r.nfe})
    else:
        cands = label.split("+")
        sch = search_schedule(model, x, nfe, candidates=cands, holdout=holdout, cond=cond,
                              holdout_cond=holdout_cond, path=path,
                              seed=seed, reference=ref, **options)
        settings.update(calibration_nfe=sch.calibration_nfe, holdout_batch=(
            int(x.shape[0]) if holdout is None else int(_noise(holdout, seed + 1).shape[0])))
        cal = Calibration(kind="search", solver=label, nfe=sch.nfe, times=sch.times.tolist(), solvers=sch.solvers,
                          grid=sch.grid, calib_rmse=sch.calib_rmse, holdout_rmse=sch.holdout_rmse,
                          info={"best_single": sch.best_single, "true_nfe": sch.nfe,
                                "candidates_scored": sch.candidates_scored,
                                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
                                   if isinstance(v, (int, float, str, tuple, list))}})
    cal.reference = settings
    cal.fingerprint = fp
    cal.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # the file is named by the requested budget so that the same request finds it again
    cal.nfe = int(nfe)
    if run_dir is not None and save:
        save_calibration(run_dir, cal)
    return cal


def calibrated_grid(
    run_dir_or_model: Any, solver: str, nfe: int, noise_or_shape: Optional[NoiseLike] = None, **kw
) -> Tensor:
    """The BOSS grid for ``solver`` at ``nfe`` from ``run_dir/calibrations`` (computed and saved on
    the first call, reused after). Use it as ``sample(model, noise, solver=solver, grid=...)``."""
    return calibrate(run_dir_or_model, "boss", solver, nfe, noise_or_shape, **kw).grid_tensor


def calibrated_schedule(
    run_dir_or_model: Any, nfe: int, candidates: Sequence[str] = ("euler", "midpoint", "heun"),
    noise_or_shape: Optional[NoiseLike] = None, **kw
) -> Calibration:
    """The searched schedule for ``candidates`` at ``nfe`` (cached like :func:`calibrated_grid`);
    sample with ``cal.run(model, noise)``."""
    return calibrate(run_dir_or_model, "search", list(candidates), nfe, noise_or_shape, **kw)
