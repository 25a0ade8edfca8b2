"""straightflow's side of the solver suite: a fixed-step solver on a named grid, on its BOSS grid, the
searched schedule, and a peer, each a :class:`Method` run at an exact NFE."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from straightflow.optimize import bellman_path, boss_cost_table, reference_trajectory, run_schedule, search_schedule
from straightflow.solvers import CountedVelocity, get_solver, sample

from .fields import Field, fixed_noise
from .peers import Peer


COST_MISMATCH: dict[str, str] = {}  # solver -> what its registered cost got wrong (shown in the report)


def _counted_nfe(solver: str, steps: int) -> int:
    return int(sample(lambda x, t: -x, torch.ones(1, 2, dtype=torch.float64), solver=solver, steps=steps).nfe)


def sf_steps_for_nfe(solver: str, nfe: int) -> int | None:
    """Largest step count whose exact NFE (``get_solver(solver).nfe(steps)``, warm-ups included) is
    <= ``nfe``; None unless it is exactly ``nfe``.

    The registered cost is checked once per solver against one counted run on a trivial field; a
    solver whose registered cost is wrong is noted in :data:`COST_MISMATCH` (the report lists it) and
    its step count is then found from counted runs, so its rows stay at their true NFE."""
    spec = get_solver(solver)
    if spec.name not in COST_MISMATCH:
        s = max(1, spec.steps_for_nfe(nfe))
        got = _counted_nfe(solver, s)
        if got == spec.nfe(s):
            return s if spec.nfe(s) == nfe else None
        COST_MISMATCH[spec.name] = f"registered cost {spec.nfe(s)} for {s} steps, counted {got}"
    s = max(1, spec.steps_for_nfe(nfe))
    while s > 1 and _counted_nfe(solver, s) > nfe:
        s -= 1
    while s < nfe and _counted_nfe(solver, s + 1) <= nfe:
        s += 1
    return s if _counted_nfe(solver, s) == nfe else None


def endpoint_rmse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


@dataclass
class Method:
    name: str
    library: str  # "straightflow" or the peer's library
    kind: str  # "fixed grid", "BOSS", "search", "peer"
    run: Callable[[Tensor, dict[str, Any] | None, int], tuple[Tensor, int, dict[str, Any]] | None]
    solver: str = ""
    grid: str = ""


def fixed_method(fld: Field, solver: str, grid: str) -> Method:

    def run(x, cond, nfe):
        steps = sf_steps_for_nfe(solver, nfe)
        if steps is None:
            return None
        r = sample(fld.model, x, solver=solver, steps=steps, grid=grid, cond=cond)
        return r.x, r.nfe, {"steps": steps}

    return Method(f"{solver} / {grid}", "straightflow", "fixed grid", run, solver, grid)


class CalibrationBatch:
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
                    holdout=fixed_noise(hold, 7, self.fld.dtype), holdout_cond=hcond, cond=self.fld.calib_cond,
                    reference=self.ref)
            self.seconds += time.perf_counter() - t0
        return self.schedules[nfe]


def boss_method(fld: Field, cal: CalibrationBatch, solver: str) -> Method:

    def run(x, cond, nfe):
        g = cal.boss(solver, nfe)
        if g is None:
            return None
        r = sample(fld.model, x, solver=solver, grid=g, cond=cond)
        return r.x, r.nfe, {"steps": g.numel() - 1, "grid": g.tolist()}

    return Method(f"{solver} / BOSS", "straightflow", "BOSS", run, solver, "boss")


def search_method(fld: Field, cal: CalibrationBatch, candidates: Sequence[str], max_nfe: int) -> Method:

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


def peer_method(p: Peer, fld: Field) -> Method:
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
