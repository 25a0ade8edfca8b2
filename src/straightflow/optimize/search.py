"""Per-step solver schedules: running them and searching for the best under an NFE budget.

A schedule is a time grid ``t_0 < ... < t_K`` and one solver per step.
:func:`run_schedule` integrates along it (true NFE counted). :func:`search_schedule` is a
budgeted beam search over (grid, per-step solver) in the spirit of S^3 / USF ("A Unified
Sampling Framework for Solver Searching"), scored by the endpoint RMSE
``sqrt(mean((x - x_ref(1))^2))`` against the reference on the calibration batch and reported on
a held-out batch; the single-solver baselines are in its pool, so it never does worse than
the best of them on the calibration batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..grids import make_grid, validate_grid
from ..paths import PathLike as PathSpec
from ..solvers import SampleResult, get_solver
from ..solvers.base import CountedVelocity, NonFiniteError
from .base import NoiseLike, _check_deterministic, _noise, _repeat_cond, _rmse, _solver_options
from .boss import bellman_path, boss_cost_table
from .reference import ReferenceTrajectory, _reference_end, reference_trajectory


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
        x = spec.run(f, x, ts[k:e + 1], callback=cb, **_solver_options(spec, path))
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
    # the cost of one step inside the grid (a first step from t = 0 can be cheaper for DPM-Solver++(2S))
    cost = {s.name: s.nfe(1) if s.cost is not None else s.evals_per_step for s in specs}
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
                    fv = CountedVelocity(model, _repeat_cond(cond, B, len(ok)))
                    out = s.run(fv, xs, tl[k:k + 2], **_solver_options(s, path))
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
