"""Learned non-stationary multistep solvers: one linear family that holds every classical solver.

The family (a non-stationary linear multistep method, as in Bespoke Non-Stationary solvers,
Shaul et al. 2024, and S4S, 2025): ``n`` velocity evaluations at times ``tau_0 <= ... <=
tau_{n-1}`` in [0, 1]; evaluation ``j`` is made at the point

    X_j = a_j x_0 + sum_{k<j} b_jk u_k,        u_j = v(X_j, tau_j),

and the output is ``x_1 ~ a_n x_0 + sum_{k<n} b_nk u_k``. Parameters: ``n`` times and
``(n + 1)(n + 2) / 2`` coefficients (76 at NFE 10).

Every solver whose update is linear in the state and in earlier velocities is a point of this
family: Euler, Heun, midpoint and every explicit Runge-Kutta method, Adams-Bashforth, PLMS,
iPNDM, heavy-ball momentum, and (because the data prediction ``x1_hat = c_x(t) x + c_v(t) v``
is linear in ``x`` and ``v`` on any affine path) DPM-Solver++, UniPC and DEIS. Their
coefficients are obtained *exactly* by :meth:`LearnedSolver.from_solver`: the registered
solver coroutine is traced once (:func:`~.protocol.trace`, the same driver as every solve) with
the state a coefficient vector in the basis ``[x_0, u_0, ..., u_{n-1}]`` (a batch of one row of
length ``n + 1``) and a velocity that answers request ``j`` with the basis vector ``e_{j+1}``.
The point of request ``j`` is row ``j`` of the table, its time is ``tau_j``, the final state is
the output row. The table then
reproduces the classical solver to rounding (tested in float64 for many solvers and NFE).

:func:`sample_learned` runs a table on a model (NFE counted by
:class:`~straightflow.solvers.base.CountedVelocity`, classifier-free guidance at the scale the
table was calibrated with). Fitting the table to a model is :mod:`straightflow.fit_solvers`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..grids import GridLike, make_grid
from ..paths import PathLike, get_path
from .base import SOLVERS, CountedVelocity, SampleResult, lincomb
from .guidance import ClassifierFreeGuidance
from .protocol import Eval, drive

__all__ = ["LearnedSolver", "sample_learned", "ns_solve", "ns_table", "symbolic_run", "SymbolicRun"]

Number = Union[float, Tensor]


# ---------------------------------------------------------------------------- the sampler
def _comb(a: Number, x: Tensor, b: Sequence[Number], us: Sequence[Tensor]) -> Tensor:
    """``a x + sum_k b_k u_k``: one fused pass with float coefficients, autograd with tensor ones."""
    if any(torch.is_tensor(c) for c in [a, *b]):
        out = a * x
        for c, u in zip(b, us):
            out = out + c * u
        return out
    terms = [(a, x)] + list(zip(b, us))
    return lincomb(terms) if any(float(c) != 0.0 for c, _ in terms) else torch.zeros_like(x)


def ns_table(x0: Tensor, times: Sequence[Number], a: Sequence[Number], b: Sequence[Sequence[Number]],
             us: Optional[List[Tensor]] = None, upto: Optional[int] = None, index: Optional[Sequence[int]] = None):
    """The table as a solver coroutine (:mod:`.protocol`): ``X_j = a_j x0 + sum_{k<j} b_jk u_k``,
    ``u_j = yield Eval(X_j, tau_j, j)``; returns the output ``a_n x0 + sum_k b_nk u_k`` and the velocities.

    ``us``: velocities already computed for the first ``len(us)`` rows (reused, not recomputed:
    the caller vouches that those rows did not change). ``upto``: stop after ``upto``
    evaluations and return row ``upto`` (the point of the next evaluation, or the output).
    ``index[j]``: the step index to put in request ``j`` (default ``j``).
    Float coefficients take the fused path; tensor coefficients (and times) stay differentiable.
    """
    n = len(times)
    upto = n if upto is None else int(upto)
    us = list(us or [])
    for j in range(len(us), upto):
        us.append((yield Eval(_comb(a[j], x0, b[j][:j], us), times[j], j if index is None else index[j])))
    return _comb(a[upto], x0, b[upto][:upto], us), us


def ns_solve(f: Callable, x0: Tensor, times: Sequence[Number], a: Sequence[Number],
             b: Sequence[Sequence[Number]], us: Optional[List[Tensor]] = None,
             upto: Optional[int] = None) -> Tuple[Tensor, List[Tensor]]:
    """:func:`ns_table` driven by ``f(X, tau, j)``: returns ``(output, velocities)``."""
    return drive(ns_table(x0, times, a, b, us, upto), f)


# ---------------------------------------------------------------------------- symbolic run
@dataclass
class SymbolicRun:
    """What :func:`symbolic_run` records: evaluation ``times``, the rows of the evaluation points
    and of the output in the basis ``[x_0, u_0, ..., u_{n-1}]``, and the rows of the states the
    solver reports at its grid times (``states``: ``(grid index, t, row)``)."""

    times: List[float]
    rows: List[List[float]]
    out: List[float]
    states: List[Tuple[int, float, List[float]]]


def _is_fixed_deterministic(spec) -> bool:
    return not spec.stochastic and not spec.adaptive


def symbolic_run(solver: str, grid: Tensor, path: PathLike = "linear",
                 wrap: Optional[Callable[[Callable], Callable]] = None, **options) -> SymbolicRun:
    """Run registered ``solver`` on ``grid`` with a coefficient-vector state (see the module doc).

    ``wrap(f) -> f'`` may transform the velocity function first (a compensation that is linear in
    the evaluations, e.g. DC-Solver's); it sees the symbolic state and velocities. Raises
    ``ValueError`` for stochastic or adaptive solvers and for a solver whose update is not
    causal and linear (an evaluation point that depends on a velocity not yet computed).
    """
    spec = SOLVERS.get(solver)
    if not _is_fixed_deterministic(spec):
        raise ValueError(f"solver {spec.name!r} is stochastic or adaptive: it has no fixed linear table")
    ts = [float(t) for t in grid]
    opts = dict(options)
    if spec.needs_path:
        opts.setdefault("path", get_path(path))
    n = spec.trace(torch.zeros(1, 1, dtype=torch.float64), ts, wrap(_zero) if wrap else None, **opts).nfe
    if n == 0:
        raise ValueError(f"solver {spec.name!r} made no evaluation on the grid")

    def basis(x, t, i=-1):  # the velocity of request j is the basis vector of u_j
        e = torch.zeros_like(x)
        if basis.j >= n:
            raise ValueError(f"solver {spec.name!r} made more evaluations than on its first run")
        basis.j += 1
        e[0, basis.j] = 1.0
        return e

    basis.j = 0
    x0 = torch.zeros(1, n + 1, dtype=torch.float64)
    x0[0, 0] = 1.0
    run = spec.trace(x0, ts, wrap(basis) if wrap else basis, **opts)
    rows = [e.x.reshape(-1).tolist() for e in run.evals]
    for j, r in enumerate(rows):
        if any(abs(c) > 0.0 for c in r[j + 1:]):
            raise ValueError(f"solver {spec.name!r}: evaluation {j} depends on later evaluations (not causal)")
    return SymbolicRun(run.times, rows, run.result.reshape(-1).tolist(),
                       [(int(st.i), float(st.t), st.x.reshape(-1).tolist()) for st in run.states])


def _zero(x, t, i=-1):
    return torch.zeros_like(x)


# ---------------------------------------------------------------------------- the table
@dataclass
class LearnedSolver:
    """A non-stationary multistep table (see the module doc): plain floats, JSON-serialisable.

    ``times`` (n), ``a`` (n + 1), ``b`` (row ``j`` has ``j`` entries, ``j = 0..n``).
    ``guidance``: the classifier-free guidance scale it was made for (None: unguided).
    ``meta``: free-form description (initial solver, path, fitting mode, model fingerprint, ...).
    """

    times: List[float]
    a: List[float]
    b: List[List[float]]
    guidance: Optional[float] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.times = [float(t) for t in self.times]
        self.a = [float(v) for v in self.a]
        self.b = [[float(v) for v in row] for row in self.b]
        n = len(self.times)
        if n < 1:
            raise ValueError("a learned solver needs at least one evaluation time")
        if len(self.a) != n + 1 or len(self.b) != n + 1 or any(len(r) != j for j, r in enumerate(self.b)):
            raise ValueError(f"coefficient table has the wrong shape for {n} evaluations: need len(a) = "
                             f"{n + 1} and len(b[j]) = j for j = 0..{n}")
        vals = self.times + self.a + [v for r in self.b for v in r]
        if not all(math.isfinite(v) for v in vals):
            raise ValueError("learned solver coefficients must be finite")
        if any(t < -1e-12 or t > 1 + 1e-12 for t in self.times):
            raise ValueError(f"evaluation times must lie in [0, 1], got {self.times}")
        if any(t1 < t0 - 1e-12 for t0, t1 in zip(self.times, self.times[1:])):
            raise ValueError(f"evaluation times must be non-decreasing, got {self.times}")
        if self.guidance is not None:
            self.guidance = float(self.guidance)

    @property
    def nfe(self) -> int:
        """Velocity evaluations per sample (twice as many rows are computed under guidance)."""
        return len(self.times)

    @property
    def n_params(self) -> int:
        n = self.nfe
        return n + (n + 1) * (n + 2) // 2

    @classmethod
    def from_solver(cls, solver: str, steps: int, grid: GridLike = "uniform", path: PathLike = "linear",
                    grid_options: Optional[Dict[str, Any]] = None, guidance: Optional[float] = None,
                    **options) -> "LearnedSolver":
        """The exact table of a registered deterministic fixed-step ``solver`` on ``steps`` steps of
        ``grid`` (see :func:`symbolic_run`); ``options`` are the solver's own."""
        g = make_grid(grid, None if not isinstance(grid, str) else steps, **(grid_options or {}))
        run = symbolic_run(solver, g, path, **options)
        return cls.from_run(run, guidance=guidance, meta={
            "init": SOLVERS.get(solver).name, "steps": int(g.numel() - 1), "grid": g.tolist(),
            "path": get_path(path).config(), "options": {k: v for k, v in options.items() if _jsonable(v)}})

    @classmethod
    def from_run(cls, run: SymbolicRun, guidance: Optional[float] = None,
                 meta: Optional[Dict[str, Any]] = None) -> "LearnedSolver":
        rows = run.rows + [run.out]
        return cls(list(run.times), [r[0] for r in rows], [r[1:1 + j] for j, r in enumerate(rows)],
                   guidance=guidance, meta=dict(meta or {}))

    def tensors(self, dtype=torch.float64) -> Tuple[Tensor, Tensor, Tensor]:
        """``(times (n,), a (n + 1,), B (n + 1, n))`` with ``B`` strictly lower-triangular by row."""
        n = self.nfe
        B = torch.zeros(n + 1, n, dtype=dtype)
        for j, r in enumerate(self.b):
            if r:
                B[j, :j] = torch.tensor(r, dtype=dtype)
        return torch.tensor(self.times, dtype=dtype), torch.tensor(self.a, dtype=dtype), B

    @classmethod
    def from_tensors(cls, times: Tensor, a: Tensor, B: Tensor, guidance: Optional[float] = None,
                     meta: Optional[Dict[str, Any]] = None) -> "LearnedSolver":
        n = int(times.numel())
        Bl = B.detach().double().tolist()
        return cls(times.detach().double().tolist(), a.detach().double().tolist(),
                   [Bl[j][:j] for j in range(n + 1)], guidance=guidance, meta=dict(meta or {}))

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": "learned", "times": list(self.times), "a": list(self.a), "b": [list(r) for r in self.b],
                "guidance": self.guidance, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LearnedSolver":
        if not isinstance(d, dict) or d.get("kind", "learned") != "learned":
            raise ValueError("not a learned-solver record (expected a dict with kind 'learned')")
        missing = [k for k in ("times", "a", "b") if k not in d]
        if missing:
            raise ValueError(f"learned-solver record lacks {missing}")
        return cls(d["times"], d["a"], d["b"], guidance=d.get("guidance"), meta=dict(d.get("meta") or {}))


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def sample_learned(model: Callable, noise: Tensor, solver: LearnedSolver, cond: Optional[Dict[str, Any]] = None,
                   guidance: Optional[float] = None, check_finite: bool = True) -> SampleResult:
    """Sample with a learned table from ``noise`` (t = 0) to t = 1; ``res.nfe`` is counted.

    A table made for a guidance scale runs at that scale (``guidance=None``); another scale is
    refused (the coefficients were fitted to the guided field of that scale: calibrate again).
    """
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    if guidance is not None and solver.guidance is not None and float(guidance) != solver.guidance:
        raise ValueError(f"this learned solver was calibrated at guidance scale {solver.guidance}; "
                         f"got {guidance}: calibrate one for that scale")
    w = solver.guidance if guidance is None else float(guidance)
    velocity = model if w is None else ClassifierFreeGuidance(model, w)
    f = CountedVelocity(velocity, cond, check_finite=check_finite)
    with torch.no_grad():
        x, _ = ns_solve(f, noise, solver.times, solver.a, solver.b)
    return SampleResult(x=x, nfe=f.nfe, times=torch.tensor(solver.times, dtype=torch.float64),
                        info={"solver": "learned", "init": solver.meta.get("init"), "guidance": w})
