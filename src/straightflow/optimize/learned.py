"""Solvers fitted to the user's own model: learned non-stationary tables and DC-Solver ratios.

Everything here calibrates a :class:`~straightflow.solvers.learned.LearnedSolver` (``n`` times,
``(n + 1)(n + 2) / 2`` coefficients; see that module) against an accurate reference of the same
model on a *calibration* noise batch (with its conditioning and guidance scale), checks it on a
disjoint *held-out* batch, and falls back to the initial classical solver when the fitted table
is not more accurate there (so a calibration never returns something worse than its start on
held-out noise).

Reference: float64 adaptive Dormand-Prince (``solvers.sample(..., solver="dopri5")``) at
``rtol = atol = 1e-8`` by default, on a float64 copy of the model; its states at the times a
fit needs (endpoint, or the evaluation times). Metric: RMSE over all elements.

Initial solver (:func:`select_initial`): every candidate of :data:`CANDIDATES` whose exact cost is
the target NFE (iPNDM orders 3/4, UniPC, DPM-Solver++ 2M/3M, DEIS and DEIS-pc, AB2/AB3, Heun with
FlowTurbo's pseudo-corrector, Euler, midpoint, Heun, RK4)
is converted to its exact table and run on the calibration batch; the most accurate one starts
the fit (and is the fallback).

Fitting modes (:func:`fit_learned`; the calibration kinds ``learned`` and ``dc`` of
:func:`straightflow.optimize.calibrate` call it):

* ``"grad"`` -- exact gradients through the model (small models): the loss
  ``mean |x_out(theta) - x_ref(1)|^2`` is minimised over all parameters by L-BFGS, back-propagating
  through the ``n`` evaluations (``u_j`` depends on the times and coefficients of the earlier
  rows). Times stay ordered: the distinct interior times are ``lo + (1 - lo) cumsum(softmax(w))``
  (evaluations that share a time keep sharing it), initialised exactly at the initial solver's.
* ``"ls"`` -- never back-propagates into the network (large models; PAS-like, Wang et al. 2024
  correct the sampling directions from the reference trajectory step by step): along the
  table's own trajectory, row ``j`` (the point of evaluation ``j``, then the output) is fitted
  by ridge-regularised least squares to the reference state at its time,
  ``min_c |F_j c - x_ref(tau_j)|^2 + lam |c - c_init|^2`` with ``F_j = [x_0, u_0, ..., u_{j-1}]``
  (closed form, ``(j + 1) x (j + 1)``), and ``u_j`` is then evaluated forward at the fitted point
  (``n`` model calls in all). The output row is thereby the exact minimiser of the endpoint loss
  given the velocities. Times: the initial solver's, or the best of a few SD3-shift warps of them
  (``time_shifts``), each scored by the fitted table's calibration loss.
* ``"ls+grad"`` -- ``"ls"`` then ``"grad"`` from its result.
* ``"auto"`` -- ``ls``, ``grad`` and ``ls+grad`` fitted on three quarters of the calibration
  batch; the one (or the initial table) with the lowest RMSE on the last quarter is kept.

The per-sample endpoint errors are heavy-tailed (on the checkerboard MLP 1 % of the samples
carry 90 % of the squared error at NFE 10), so the calibration batch must be large enough to
hold that tail: on cheap models use thousands of samples (``research/RESULTS.md``).

DC-Solver (:func:`fit_dc`; Zhao et al. 2024, "DC-Solver: Improving Predictor-Corrector Diffusion
Sampler via Dynamic Compensation"): each evaluation ``j >= K`` of a multistep solver is
replaced by the Lagrange interpolant (degree ``K``, in t) of the last ``K + 1`` (compensated)
data predictions evaluated at ``tau'_j = tau_{j-1} + rho_j (tau_j - tau_{j-1})``; the ratios
``rho_j`` are fitted one after the other (golden section) to the reference state after step
``j``, each kept only if the calibration endpoint does not get worse. The compensated solver is
again linear in the raw evaluations, so it is run as a table.

A DPM-Solver-v3-style solver (per-dimension empirical model statistics from the calibration
batch, Zheng et al. 2023) was built and measured here too and dropped: it was less accurate than
the best uncalibrated solver in all 24 cells measured (3 fields, NFE 3-10; ``research/RESULTS.md``).

Costs are recorded as CPU seconds (``time.process_time``) and model calls (batch evaluations,
reference included). Results are small dataclasses of floats (:class:`FitResult`), serialisable
to plain dicts (JSON); nothing is pickled.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..grids import make_grid
from ..paths import PathLike, get_path
from ..solvers import sample as _sample
from ..solvers.base import SOLVERS, CountedVelocity
from ..solvers.guidance import ClassifierFreeGuidance
from ..solvers.learned import LearnedSolver, ns_solve, symbolic_run
from ..time import shift_time
from .base import _noise, _rmse
from .errors import error_stats, per_sample_sq_error, prob_better
from .record import Calibration, CalibrationRequest, model_fingerprint, register_calibration_kind

__all__ = ["CANDIDATES", "FitResult", "Reference", "reference", "candidates", "select_initial", "fit_grad",
           "fit_ls", "fit_dc", "fit_learned", "DCCompensation"]

# (label, solver, options): the classical starting points (each at the step count whose exact cost is
# the target NFE; the Runge-Kutta ones only where that is a multiple of their stages)
CANDIDATES: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("ipndm3", "ipndm", {"order": 3}), ("ipndm", "ipndm", {}), ("unipc", "unipc", {}),
    ("dpm++2m", "dpm++2m", {}), ("dpm++3m", "dpm++3m", {}), ("deis-pc", "deis-pc", {}), ("deis", "deis", {}),
    ("ab2", "ab2", {}), ("ab3", "ab3", {}), ("heun_pc", "heun_pc", {}), ("euler", "euler", {}),
    ("midpoint", "midpoint", {}), ("heun", "heun", {}), ("rk4", "rk4", {}),
)
FIT_CONFIDENCE = 0.9  # the held-out check keeps a fitted table when P(its MSE < its start's) >= this
REF_TOL = 1e-8       # fit_learned's reference tolerance (the research tables used it)
CALIBRATE_RTOL = 1e-5  # the calibration kinds' default: ~1 % of the error of a table at NFE 10 (digits
                       # UNet: RMSE ~1e-3); a dopri5 solve of a trained digits UNet takes ~180 / 530 / 1100
                       # evaluations at rtol 1e-4 / 1e-5 / 1e-6, and the reference is most of the cost


def _phase(on_phase: Optional[Callable[[str], None]], name: str) -> None:
    if on_phase is not None:
        on_phase(name)


def _Calls(model: Callable, cond: Optional[Dict[str, Any]] = None) -> CountedVelocity:
    """The library's call counter around a model, unchecked (the fits score non-finite results
    themselves and must not sync per call inside the L-BFGS closure)."""
    return CountedVelocity(model, cond, check_finite=False)


def _velocity(model: Callable, guidance: Optional[float]) -> Callable:
    return model if guidance is None else ClassifierFreeGuidance(model, float(guidance))


def _float64(model: Callable, x: Optional[Tensor] = None, cond=None) -> Callable:
    """A float64 copy of an ``nn.Module`` for the reference, or the model itself: for other
    callables, and for a module that does not run in float64 (some compute parts of their
    input in float32, e.g. diffusers' timestep embeddings), probed on one row of ``x``."""
    if not isinstance(model, torch.nn.Module):
        return model
    m64 = copy.deepcopy(model).double().eval()
    if x is not None:
        try:
            with torch.no_grad():
                _Calls(m64, _slice_rows(cond, torch.arange(1)))(x[:1].double(), 0.5)
        except RuntimeError as e:
            warnings.warn(f"{type(model).__name__} does not run in float64 ({str(e).splitlines()[0]}); "
                          "the calibration reference runs in its own precision")
            dt = next((p.dtype for p in model.parameters()), torch.float32)

            def own_precision(y, t, **c):
                return model(y.to(dt), torch.as_tensor(t).to(dt), **c).to(y.dtype)

            return own_precision
    return m64


def _slice_rows(cond: Optional[Dict[str, Any]], rows: Tensor) -> Optional[Dict[str, Any]]:
    return None if cond is None else {k: (v[rows] if torch.is_tensor(v) and v.ndim >= 1 else v) for k, v in cond.items()}


# ---------------------------------------------------------------------------- reference
_TIME_TOL = 1e-9  # reference times closer than this are one (the state moves by ~1e-9 between them)


def _merge_times(times: Sequence[float]) -> List[float]:
    out: List[float] = []
    for t in sorted(float(v) for v in times):
        if not out or t - out[-1] > _TIME_TOL:
            out.append(t)
    return out


@dataclass
class Reference:
    """Reference states ``states[t]`` (float64) of a batch at the times asked for, and the model calls."""

    x0: Tensor
    states: Dict[float, Tensor]
    calls: int

    def at(self, t: float) -> Tensor:
        key = min(self.states, key=lambda s: abs(s - float(t)))
        if abs(key - float(t)) > _TIME_TOL:
            raise KeyError(f"no reference state at t = {t} (have {sorted(self.states)})")
        return self.states[key]

    def subset(self, rows: Tensor) -> "Reference":
        """The same reference for the batch rows ``rows`` (no model call)."""
        return Reference(self.x0[rows], {t: v[rows] for t, v in self.states.items()}, 0)

    def extend(self, model64: Callable, times: Sequence[float], cond=None, rtol: float = REF_TOL) -> "Reference":
        """Add the states at ``times`` not yet present (one more float64 dopri5 solve)."""
        have = sorted(self.states)
        new = [t for t in _merge_times(times) if not have or min(abs(t - h) for h in have) > _TIME_TOL]
        if new:
            ref = reference(model64, self.x0, new, cond=cond, rtol=rtol)
            self.states.update({t: v for t, v in ref.states.items() if min(abs(t - q) for q in new) <= _TIME_TOL})
            self.calls += ref.calls
        return self


@torch.no_grad()
def reference(model64: Callable, x0: Tensor, times: Sequence[float] = (1.0,), cond=None,
              rtol: float = REF_TOL) -> Reference:
    """float64 dopri5 from ``x0`` (t = 0) to t = 1 stopping exactly at ``times`` (in [0, 1]; times
    closer than 1e-9 are one stop, found by :meth:`Reference.at` from either)."""
    ts = _merge_times(list(times) + [1.0])
    if ts[0] < 0.0:
        raise ValueError(f"reference times must lie in [0, 1], got {ts}")
    grid = [0.0] + [t for t in ts if t > 0.0]
    f = _Calls(model64, cond)
    x = x0.double()
    states = {0.0: x.clone()} if 0.0 in ts else {}
    if len(grid) > 1:
        res = _sample(f, x, solver="dopri5", grid=torch.tensor(grid, dtype=torch.float64),
                      return_trajectory=True, rtol=rtol, atol=rtol)
        states.update({t: res.trajectory[k] for k, t in enumerate(grid) if k > 0 or t in ts})
    return Reference(x0, states, f.calls)


# ---------------------------------------------------------------------------- initial solver
def candidates(nfe: int, names: Optional[Sequence[str]] = None, path: PathLike = "linear",
               grid: str = "uniform") -> List[Tuple[str, LearnedSolver]]:
    """Exact tables of the candidate solvers that cost exactly ``nfe`` evaluations on ``grid``."""
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    out = []
    for label, solver, opts in CANDIDATES:
        if names is not None and label not in names and solver not in names:
            continue
        spec = SOLVERS.get(solver)
        steps = spec.steps_for_nfe(nfe, **opts)
        for s in (steps, steps - 1, steps + 1):
            if s < 1:
                continue
            ls = LearnedSolver.from_solver(solver, s, grid=grid, path=path, **opts)
            if ls.nfe == nfe:
                ls.meta["init"] = label
                out.append((label, ls))
                break
    if not out:
        raise ValueError(f"no candidate solver costs exactly {nfe} evaluations")
    return out


@torch.no_grad()
def select_initial(model: Callable, x0: Tensor, ref_end: Tensor, nfe: int, cond=None, guidance=None,
                   names: Optional[Sequence[str]] = None, path: PathLike = "linear"
                   ) -> Tuple[LearnedSolver, Dict[str, float], int]:
    """The most accurate candidate at ``nfe`` on the batch ``x0``; returns (table, {label: RMSE}, calls)."""
    f = _Calls(_velocity(model, guidance), cond)
    errs: Dict[str, float] = {}
    best = None
    for label, ls in candidates(nfe, names, path):
        out, _ = ns_solve(f, x0, ls.times, ls.a, ls.b)
        errs[label] = _rmse(out, ref_end)
        if math.isfinite(errs[label]) and (best is None or errs[label] < errs[best[0]]):
            best = (label, ls)
    if best is None:
        raise FloatingPointError("every candidate solver diverged on the calibration batch")
    return best[1], errs, f.calls


# ---------------------------------------------------------------------------- parametrisation
class _TimeMap:
    """Ordered times from free logits: distinct interior times ``lo + (1 - lo) cumsum(softmax(w))``.

    ``lo`` is the first initial time (kept), values equal to 1 stay at 1, and evaluations that
    share a time keep sharing it. ``w0`` reproduces the initial times (to rounding)."""

    def __init__(self, times: Sequence[float]) -> None:
        uniq = sorted(set(float(t) for t in times))
        self.lo = uniq[0]
        if self.lo >= 1.0:
            raise ValueError("the first evaluation time must be < 1")
        inner = [u for u in uniq if self.lo < u < 1.0]
        nodes = [self.lo] + inner + [1.0]
        inc = torch.tensor([b - a for a, b in zip(nodes, nodes[1:])], dtype=torch.float64)
        self.w0 = inc.log()
        pos = {u: k for k, u in enumerate(nodes)}
        self.index = torch.tensor([pos[min(pos, key=lambda u: abs(u - float(t)))] for t in times])

    def __call__(self, w: Tensor) -> Tensor:
        nodes = self.lo + (1.0 - self.lo) * torch.cumsum(torch.softmax(w, 0), 0)
        full = torch.cat([torch.full((1,), self.lo, dtype=w.dtype), nodes[:-1], torch.ones(1, dtype=w.dtype)])
        return full[self.index]


def _table_params(ls: LearnedSolver):
    tm = _TimeMap(ls.times)
    _, a, B = ls.tensors()
    n = ls.nfe
    mask = torch.tril(torch.ones(n + 1, n, dtype=torch.bool), diagonal=-1)
    return tm, a.clone(), B[mask].clone(), mask


def _assemble(tm, w, a, bflat, mask):
    B = torch.zeros(mask.shape, dtype=bflat.dtype).masked_scatter(mask, bflat)
    return tm(w), a, B


# ---------------------------------------------------------------------------- mode (a): gradients
def fit_grad(model: Callable, x0: Tensor, ref_end: Tensor, init: LearnedSolver, cond=None, guidance=None,
             iters: int = 120, fit_times: bool = True, ridge: float = 0.0) -> Tuple[LearnedSolver, Dict[str, Any]]:
    """Exact-gradient fit of every parameter (L-BFGS with a strong Wolfe line search, at most
    ``iters`` iterations and ``1.25 iters`` loss evaluations, each ``n`` model calls forward and
    back) to ``mean |x_out - ref_end|^2`` on ``x0``; ``ridge`` adds ``ridge * |theta - theta_init|^2``.
    Returns the best iterate (by calibration loss) and stats."""
    f = _Calls(_velocity(model, guidance), cond)
    tm, a0, b0, mask = _table_params(init)
    w = tm.w0.clone().requires_grad_(fit_times)
    a = a0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    params = [p for p in (w, a, b) if p.requires_grad]
    ref = ref_end.double()
    history: List[float] = []
    best = {"loss": math.inf, "state": None}

    def loss_fn():
        times, aa, BB = _assemble(tm, w, a, b, mask)
        n = init.nfe
        out, _ = ns_solve(f, x0, [times[j] for j in range(n)], [aa[j] for j in range(n + 1)],
                          [[BB[j, k] for k in range(j)] for j in range(n + 1)])
        loss = (out.double() - ref).pow(2).mean()
        if ridge:
            loss = loss + ridge * ((a - a0).pow(2).sum() + (b - b0).pow(2).sum())
        return loss

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=int(iters), max_eval=int(iters) * 5 // 4, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        if not torch.isfinite(loss):
            return loss
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        v = float(loss.detach())
        if v < best["loss"]:
            best["loss"], best["state"] = v, (w.detach().clone(), a.detach().clone(), b.detach().clone())
        return loss

    with torch.enable_grad():
        opt.step(closure)
    history.append(best["loss"])
    wb, ab, bb = best["state"]
    times, aa, BB = _assemble(tm, wb, ab, bb, mask)
    fitted = LearnedSolver.from_tensors(times, aa, BB, guidance=init.guidance, meta=dict(init.meta))
    return fitted, {"calls": f.calls, "loss_history": history, "calib_rmse": math.sqrt(max(best["loss"], 0.0))}


# ---------------------------------------------------------------------------- mode (b): least squares
@torch.no_grad()
def fit_ls(model: Callable, x0: Tensor, ref: Reference, init: LearnedSolver, cond=None, guidance=None,
           ridge: float = 1e-6) -> Tuple[LearnedSolver, Dict[str, Any]]:
    """Row-by-row ridge least squares along the table's own trajectory (module doc, mode ``"ls"``);
    ``ref`` must hold the states at the table's times and at 1. ``n`` model calls, no backprop."""
    f = _Calls(_velocity(model, guidance), cond)
    n = init.nfe
    a, b = list(init.a), [list(r) for r in init.b]
    flat = lambda z: z.reshape(-1).double()  # noqa: E731
    feats = [flat(x0)]
    us: List[Tensor] = []
    for j in range(n + 1):
        if j > 0:
            y = flat(ref.at(init.times[j] if j < n else 1.0))
            F = torch.stack(feats)  # (j + 1, N)
            G = F @ F.T
            c0 = torch.tensor([a[j]] + b[j], dtype=torch.float64)
            lam = ridge * float(torch.diagonal(G).mean())
            c = torch.linalg.solve(G + lam * torch.eye(j + 1, dtype=torch.float64), F @ y + lam * c0)
            if not bool(torch.isfinite(c).all()):
                c = c0
            a[j], b[j] = float(c[0]), c[1:].tolist()
        if j < n:
            X = a[j] * x0 + sum(bk * uk for bk, uk in zip(b[j], us)) if us else a[j] * x0
            us.append(f(X, init.times[j], j))
            feats.append(flat(us[-1]))
    fitted = LearnedSolver(list(init.times), a, b, guidance=init.guidance, meta=dict(init.meta))
    return fitted, {"calls": f.calls}


def _warp(ls: LearnedSolver, s: float) -> LearnedSolver:
    """``ls`` with its times pushed through the SD3 shift ``s`` (same coefficients)."""
    if s == 1.0:
        return ls
    t = shift_time(torch.tensor(ls.times, dtype=torch.float64), s).clamp(0.0, 1.0).tolist()
    return LearnedSolver(t, ls.a, ls.b, guidance=ls.guidance, meta=dict(ls.meta))


# ---------------------------------------------------------------------------- DC-Solver
class DCCompensation:
    """DC-Solver's dynamic compensation as a velocity wrapper (linear in the evaluations).

    Evaluation ``j >= order`` returns, instead of ``m_j``, the Lagrange interpolant in t of the last
    ``order + 1`` compensated data predictions evaluated at ``tau_{j-1} + rho_j (tau_j - tau_{j-1})``
    (converted back to a velocity at ``X_j``); ``rho_j = 1`` (the default) changes nothing.
    ``space="velocity"`` interpolates the velocities themselves instead."""

    def __init__(self, ratios: Dict[int, float], order: int = 2, path: PathLike = "linear", space: str = "data") -> None:
        if order < 1:
            raise ValueError(f"DC order must be >= 1, got {order}")
        if space not in ("data", "velocity"):
            raise ValueError(f"space must be 'data' or 'velocity', got {space!r}")
        self.ratios, self.order, self.path, self.space = dict(ratios), int(order), get_path(path), space

    def __call__(self, f: Callable) -> Callable:
        hist: List[Tuple[float, Tensor]] = []
        p = self.path

        def g(x, t, i=-1):
            v = f(x, t, i)
            j = len(hist)
            tt = torch.as_tensor(float(t), dtype=x.dtype, device=x.device)
            m = v if self.space == "velocity" else p.velocity_to_x1(v, x, tt)
            rho = self.ratios.get(j, 1.0)
            pts = hist[-self.order:] + [(float(t), m)]
            distinct = len({p_[0] for p_ in pts}) == len(pts)  # a stage at a repeated time: left alone
            if rho != 1.0 and j >= self.order and distinct:
                tp = pts[-2][0] + rho * (pts[-1][0] - pts[-2][0])
                m_c = 0.0
                for k, (tk, mk) in enumerate(pts):
                    w = 1.0
                    for l, (tl, _) in enumerate(pts):
                        if l != k:
                            w *= (tp - tl) / (tk - tl)
                    m_c = m_c + w * mk
                m = m_c
                v = m if self.space == "velocity" else p.x1_to_velocity(m, x, tt)
            hist.append((float(t), m))
            return v

        return g


@torch.no_grad()
def fit_dc(model: Callable, x0: Tensor, ref: Reference, solver: str, steps: int, cond=None, guidance=None,
           order: int = 2, path: PathLike = "linear", grid: str = "uniform", options: Optional[Dict[str, Any]] = None,
           bounds: Tuple[float, float] = (0.0, 2.0), trials: int = 14, ref_velocity: Optional[Callable] = None,
           rtol: float = REF_TOL) -> Tuple[LearnedSolver, Dict[str, Any]]:
    """Fit DC-Solver's ratios ``rho_j`` of ``solver`` one after the other (golden-section search in
    ``bounds``) to the reference state at the first grid time after evaluation ``j``; the raw
    evaluations up to ``j`` are cached (a ratio changes only later rows). ``ref`` is extended
    with the grid times it lacks using ``ref_velocity`` (the float64 reference velocity, guidance
    included). Returns the compensated table."""
    f = _Calls(_velocity(model, guidance), cond)
    opts = dict(options or {})
    g = make_grid(grid, steps)
    base = symbolic_run(solver, g, path, **opts)
    if ref_velocity is not None:
        ref.extend(ref_velocity, [t for _, t, _ in base.states], cond=cond, rtol=rtol)
    n = len(base.times)
    ratios: Dict[int, float] = {}
    us: List[Tensor] = []
    gr = (math.sqrt(5) - 1) / 2

    def table(r):
        run = symbolic_run(solver, g, path, wrap=DCCompensation(r, order, path), **opts)
        return run

    def state_loss(run, j, end=False):
        # the reported state at the first grid time after evaluation j (or the output), and the
        # evaluations it needs (the cached ones up to j are reused: a ratio changes only later rows)
        tj = run.times[j]
        hit = [(t, row) for _, t, row in run.states if t > tj + 1e-12]
        if not hit:
            return None
        t, row = hit[-1] if end else hit[0]
        last = max([k for k, c in enumerate(row[1:]) if c != 0.0] + [j])
        ls = LearnedSolver.from_run(run)
        _, uu = ns_solve(f, x0, ls.times, ls.a, ls.b, us=us[: j + 1], upto=last + 1)
        return _rmse(row[0] * x0 + sum(c * u for c, u in zip(row[1:], uu)), ref.at(t))

    for j in range(order, n):
        if len(us) < j + 1:
            ls = LearnedSolver.from_run(table(ratios))
            _, us = ns_solve(f, x0, ls.times, ls.a, ls.b, us=us, upto=j + 1)
        if state_loss(table(ratios), j) is None:
            continue
        lo, hi = bounds
        c1, c2 = hi - gr * (hi - lo), lo + gr * (hi - lo)
        val: Dict[float, float] = {}

        def L(r):
            if r not in val:
                val[r] = state_loss(table({**ratios, j: r}), j)
            return val[r]

        for _ in range(int(trials)):
            if L(c1) <= L(c2):
                hi, c2 = c2, c1
                c1 = hi - gr * (hi - lo)
            else:
                lo, c1 = c1, c2
                c2 = lo + gr * (hi - lo)
        cand = min(val, key=lambda r: val[r])
        # kept only if the endpoint on the calibration batch does not get worse (DC-Solver fits the
        # intermediate states; a ratio that helps there can still hurt the output)
        if state_loss(table({**ratios, j: cand}), j, end=True) <= state_loss(table(ratios), j, end=True):
            ratios[j] = cand
        us = us[: j + 1]
    run = table(ratios)
    fitted = LearnedSolver.from_run(run, guidance=guidance, meta={"init": f"dc-{solver}", "dc_ratios": ratios,
                                                                  "dc_order": order})
    return fitted, {"calls": f.calls, "ratios": ratios}


# ---------------------------------------------------------------------------- calibration
@dataclass
class FitResult:
    """A calibration: the table to use (the fitted one, or the initial one on fallback) and its record."""

    solver: LearnedSolver
    initial: LearnedSolver
    mode: str
    nfe: int
    calib_rmse: Dict[str, float]
    heldout_rmse: Dict[str, float]
    fallback: bool
    cpu_seconds: float
    model_calls: Dict[str, int]
    candidates: Dict[str, float] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": "learned-solver-calibration", "solver": self.solver.to_dict(), "initial": self.initial.to_dict(),
                "mode": self.mode, "nfe": self.nfe, "calib_rmse": dict(self.calib_rmse),
                "heldout_rmse": dict(self.heldout_rmse), "fallback": self.fallback, "cpu_seconds": self.cpu_seconds,
                "model_calls": dict(self.model_calls), "candidates": dict(self.candidates), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FitResult":
        if d.get("kind") != "learned-solver-calibration":
            raise ValueError("not a learned-solver calibration record")
        return cls(LearnedSolver.from_dict(d["solver"]), LearnedSolver.from_dict(d["initial"]), d["mode"], int(d["nfe"]),
                   dict(d["calib_rmse"]), dict(d["heldout_rmse"]), bool(d["fallback"]), float(d["cpu_seconds"]),
                   dict(d["model_calls"]), dict(d.get("candidates") or {}), dict(d.get("meta") or {}))


MODES = ("grad", "ls", "ls+grad", "dc", "auto")
AUTO_MODES = ("ls", "grad", "ls+grad")


def fit_learned(model: Callable, calib: Tensor, heldout: Tensor, nfe: int, mode: str = "auto", cond=None,
              heldout_cond=None, guidance: Optional[float] = None, path: PathLike = "linear",
              init: Optional[LearnedSolver] = None, names: Optional[Sequence[str]] = None,
              model64: Optional[Callable] = None, rtol: float = REF_TOL, grad_iters: int = 120,
              ridge: float = 1e-6, time_shifts: Sequence[float] = (0.7, 1.0, 1.4), dc_solver: Optional[str] = None,
              references: Optional[Tuple[Reference, Reference]] = None, grad_rows: int = 2048,
              on_phase: Optional[Callable[[str], None]] = None) -> FitResult:
    """Fit a learned table (or DC ratios, ``mode="dc"``) at ``nfe`` evaluations to ``model``.

    ``mode``: ``"grad"``, ``"ls"``, ``"ls+grad"``, ``"dc"`` (module doc) or ``"auto"``: each of
    ``ls``, ``grad``, ``ls+grad`` fitted on three quarters of ``calib`` and the one (or the
    initial table) with the lowest RMSE on the remaining quarter kept.

    ``calib`` / ``heldout``: disjoint noise batches (t = 0) with their conditioning ``cond`` /
    ``heldout_cond``; ``guidance``: classifier-free guidance scale (stored in the table).
    ``init``: the starting table (default: :func:`select_initial` over ``names``).
    ``model64``: float64 model for the reference (default: a float64 copy of an ``nn.Module``).
    ``references``: precomputed (calibration, held-out) references to reuse across NFE; the
    calibration one is extended with the times a fit needs.
    ``grad_rows``: the gradient fits (which back-propagate through the model ``grad_iters`` times)
    use at most this many rows of the calibration batch; the least-squares fits use all of it.
    ``on_phase(name)`` is called as each phase ends (``"reference"``, ``"select"``, a mode's name,
    ``"held-out"``): progress bars.

    Held-out check (:mod:`.errors`): the fitted table is returned only if the paired bootstrap
    probability that its mean squared error on the held-out population is below the initial
    table's is at least :data:`FIT_CONFIDENCE`; ``heldout_stats`` is the chosen table's held-out
    RMSE with its prediction interval and 99th-percentile per-sample error.
    """
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; valid: {', '.join(MODES)}")
    if not torch.is_tensor(calib) or not torch.is_tensor(heldout):
        raise TypeError("calib and heldout must be noise tensors")
    if calib.shape[1:] != heldout.shape[1:]:
        raise ValueError(f"calib and heldout have different sample shapes {tuple(calib.shape[1:])} and {tuple(heldout.shape[1:])}")
    cpu0 = time.process_time()
    m64 = _velocity(model64 if model64 is not None else _float64(model, calib, cond), guidance)
    if references is None:
        rc = reference(m64, calib, cond=cond, rtol=rtol)
        rh = reference(m64, heldout, cond=heldout_cond, rtol=rtol)
        _phase(on_phase, "reference")
    else:
        rc, rh = references
    ref_calls0 = 0 if references is None else rc.calls + rh.calls
    calls = {"select": 0, "fit": 0, "heldout": 0}
    cands: Dict[str, float] = {}
    if init is None:
        init, cands, calls["select"] = select_initial(model, calib, rc.at(1.0), nfe, cond, guidance, names, path)
        _phase(on_phase, "select")
    elif init.nfe != nfe:
        raise ValueError(f"init has {init.nfe} evaluations, not nfe = {nfe}")
    init = LearnedSolver(init.times, init.a, init.b, guidance=guidance, meta=dict(init.meta))

    def run_mode(md: str, x: Tensor, r: Reference, c) -> LearnedSolver:
        fitted = init
        if md == "dc":
            label = dc_solver or init.meta.get("init", "unipc")
            spec_name, opts = next(((s_, o) for l_, s_, o in CANDIDATES if l_ == label), (label, {}))
            steps = int(init.meta.get("steps") or SOLVERS.get(spec_name).steps_for_nfe(nfe, **opts))
            fitted, st = fit_dc(model, x, r, spec_name, steps, c, guidance, path=path, options=opts,
                                ref_velocity=m64, rtol=rtol)
            calls["fit"] += st["calls"]
        if md in ("ls", "ls+grad"):
            best = None
            for sh in time_shifts:
                cand, st = fit_ls(model, x, r, _warp(init, sh), c, guidance, ridge=ridge)
                f = _Calls(_velocity(model, guidance), c)
                with torch.no_grad():
                    err = _rmse(ns_solve(f, x, cand.times, cand.a, cand.b)[0], r.at(1.0))
                calls["fit"] += st["calls"] + f.calls
                if math.isfinite(err) and (best is None or err < best[0]):
                    best = (err, cand, sh)
            if best is not None:
                fitted = best[1]
                fitted.meta["time_shift"] = best[2]
        if md in ("grad", "ls+grad"):
            rows = torch.arange(min(int(x.shape[0]), int(grad_rows)))  # L-BFGS through the model: a subset
            fitted, st = fit_grad(model, x[rows], r.at(1.0)[rows], fitted, _slice_rows(c, rows), guidance,
                                  iters=grad_iters)
            calls["fit"] += st["calls"]
        return fitted

    if mode in ("ls", "ls+grad", "auto"):  # the reference at every time the least-squares fits use (one solve)
        rc.extend(m64, [t for sh in time_shifts for t in _warp(init, sh).times], cond=cond, rtol=rtol)
    if mode != "auto":
        fitted = run_mode(mode, calib, rc, cond)
        _phase(on_phase, mode)
    else:
        # choose among the modes on a validation quarter of the calibration batch (fitted on the
        # other three quarters), so the held-out batch stays untouched until the final check
        nb = calib.shape[0]
        nv = max(1, nb // 4)
        fit_rows, val_rows = torch.arange(nb - nv), torch.arange(nb - nv, nb)
        cf, cv = _slice_rows(cond, fit_rows), _slice_rows(cond, val_rows)
        rf, rv = rc.subset(fit_rows), rc.subset(val_rows)
        fv = _Calls(_velocity(model, guidance), cv)
        scores = {}
        tables = {"init": init}
        for md in AUTO_MODES:
            tables[md] = run_mode(md, calib[fit_rows], rf, cf)
            _phase(on_phase, md)
        with torch.no_grad():
            for md, tb in tables.items():
                scores[md] = _rmse(ns_solve(fv, calib[val_rows], tb.times, tb.a, tb.b)[0], rv.at(1.0))
        calls["fit"] += fv.calls
        pick = min(scores, key=lambda k: scores[k] if math.isfinite(scores[k]) else math.inf)
        fitted = tables[pick]
        fitted.meta["auto"] = {"picked": pick, "validation_rmse": scores}
    # held-out check and fallback: per-sample errors, paired bootstrap (module errors)
    f = _Calls(_velocity(model, guidance), heldout_cond)
    with torch.no_grad():
        f.cond = dict(heldout_cond or {})
        e_init = per_sample_sq_error(ns_solve(f, heldout, init.times, init.a, init.b)[0], rh.at(1.0))
        e_fit = per_sample_sq_error(ns_solve(f, heldout, fitted.times, fitted.a, fitted.b)[0], rh.at(1.0))
        h_init, h_fit = float(e_init.mean().sqrt()), float(e_fit.mean().sqrt())
        fc = _Calls(_velocity(model, guidance), cond)
        c_init = _rmse(ns_solve(fc, calib, init.times, init.a, init.b)[0], rc.at(1.0))
        c_fit = _rmse(ns_solve(fc, calib, fitted.times, fitted.a, fitted.b)[0], rc.at(1.0))
    calls["heldout"] = f.calls + fc.calls
    p_better = prob_better(e_fit, e_init) if fitted is not init else 0.0
    fallback = not (math.isfinite(h_fit) and p_better >= FIT_CONFIDENCE)
    chosen = init if fallback else fitted
    h_stats = error_stats(e_init if fallback else e_fit)
    _phase(on_phase, "held-out")
    calls["reference"] = rc.calls + rh.calls - ref_calls0  # incurred by this calibration
    meta = {"fingerprint": model_fingerprint(model, strict=False), "shape": list(calib.shape[1:]), "path": get_path(path).config(),
            "init": init.meta.get("init"), "guidance": guidance, "n_calib": int(calib.shape[0]),
            "n_heldout": int(heldout.shape[0]), "ref_rtol": rtol, "n_params": chosen.n_params,
            "p_better": p_better, "heldout_stats": h_stats.to_dict()}
    chosen.meta.update({"mode": mode if not fallback else "fallback", **{k: meta[k] for k in ("fingerprint", "init")}})
    return FitResult(chosen, init, mode, nfe, {"init": c_init, "fitted": c_fit}, {"init": h_init, "fitted": h_fit},
                     fallback, time.process_time() - cpu0, calls, cands, meta)


# ---------------------------------------------------------------------------- calibration kinds
def _fit_request(req: CalibrationRequest, mode: str) -> Calibration:
    """Run :func:`fit_learned` for a :class:`CalibrationRequest` and wrap the result as a :class:`Calibration`:
    on the given batches when they are pinned (``req.budget_s is None``), else self-sized (:func:`_self_sized`)."""
    opts = dict(req.options)
    mode = opts.pop("mode", mode)
    rtol = float(opts.pop("rtol", CALIBRATE_RTOL))
    names = None if req.solver == "auto" else [req.solver]
    if req.budget_s is not None:
        return _self_sized(req, mode, rtol, names, opts)
    xh = _noise(req.holdout if req.holdout is not None else tuple(req.x.shape), req.seed + 1)
    if xh.shape[1:] != req.x.shape[1:]:
        raise ValueError(f"the held-out batch has samples of shape {tuple(xh.shape[1:])}, the calibration batch "
                         f"{tuple(req.x.shape[1:])}")
    hcond = req.holdout_cond if req.holdout_cond is not None else (req.cond if req.holdout is None else None)
    res = fit_learned(req.model, req.x, xh, req.nfe, mode=mode, cond=req.cond, heldout_cond=hcond,
                      guidance=req.guidance, path=req.path, names=names, rtol=rtol, **opts)
    return _as_calibration(req, mode, rtol, res, {"self_sized": False})


# self-sizing (issue: the error is dominated by rare samples near the boundaries between modes; a
# small batch may hold none of them, and then neither the fit nor the held-out check can see them)
PILOT_BATCH = 32           # the first, timed fit
MIN_STABLE_BATCH = 1024    # a cheap model keeps growing to at least this many samples
MAX_BATCH = 8192
STABLE_REL_HALFWIDTH = 0.10  # held-out RMSE known to +-10 % (prediction interval, errors.ErrorStats)


def _draw(n: int, shape: Tuple[int, ...], seed: int) -> Tensor:
    """``n`` noise samples as fixed chunks of 256 drawn with seeds ``seed, seed + 1, ...``: a larger
    draw always extends a smaller one (the same first rows)."""
    chunks = [torch.randn(256, *shape, generator=torch.Generator().manual_seed(seed + k))
              for k in range((n + 255) // 256)]
    return torch.cat(chunks)[:n]


@torch.no_grad()
def _call_cost_scale(model: Callable, shape: Tuple[int, ...], cond_for: Callable) -> Callable[[int], float]:
    """``scale(n)``: the CPU cost of one model call on ``n`` rows relative to one on :data:`PILOT_BATCH`
    rows, from timing calls at 32 and 1024 rows (best of 3): ``a + b n`` fitted through both. A small
    model costs about the same per call whatever the batch (Python and kernel-launch overhead), a
    UNet about ``n / 32`` times more; a fit's cost is its calls times this."""
    def timed(n: int) -> float:
        x = torch.randn(n, *shape)
        c = cond_for(n) or {}
        f = CountedVelocity(model, c, check_finite=False)
        best = math.inf
        for _ in range(3):
            t = time.process_time()
            f(x, 0.5)
            best = min(best, time.process_time() - t)
        return max(best, 1e-6)

    t_small, t_big = timed(PILOT_BATCH), timed(1024)
    b = max(0.0, (t_big - t_small) / (1024 - PILOT_BATCH))
    a = max(1e-6, t_small - PILOT_BATCH * b)
    return lambda n: (a + b * n) / (a + b * PILOT_BATCH)


def _self_sized(req: CalibrationRequest, mode: str, rtol: float, names, opts) -> Calibration:
    """Grow the calibration and held-out batches (same size ``n``, disjoint seeds) until the held-out
    RMSE is stable or the CPU budget ``req.budget_s`` is spent.

    Pilot fits on :data:`PILOT_BATCH` samples are timed: ``ls`` (no back-propagation) first, then,
    when that took at most 15 % of the budget, ``auto``; its extra cost is the gradient fits', which
    run on at most ``grad_rows`` rows (the largest 32 * 4^k whose predicted cost is <= 40 % of the
    budget); ``auto`` is used only if its gradient part fits in 40 % of the budget. A model so
    expensive that even the ls pilot takes most of the budget keeps the pilot's result. The first
    real fit takes the largest ``n`` (the pilot times a power of 4) predicted to cost at most 60 %
    of what is left; then ``n`` grows
    (x4, or x2 when only that fits) while the held-out prediction interval is wider than
    +-:data:`STABLE_REL_HALFWIDTH` (or ``n < MIN_STABLE_BATCH``) and the next fit (predicted from
    the last one, times 2.2 per doubling) fits in what is left. The last fit is the calibration; the history is recorded in ``info["sizing"]``.
    """
    cpu0 = time.process_time()
    budget = float(req.budget_s)
    shape = tuple(int(s) for s in req.x.shape[1:])
    seed_c, seed_h = 1_000_003 * (req.seed + 1), 2_000_029 * (req.seed + 1)
    bar = _ProgressBar(req, budget)
    history: List[Dict[str, Any]] = []

    def fit(n: int, md: str) -> FitResult:
        t = time.process_time()
        res = fit_learned(req.model, _draw(n, shape, seed_c), _draw(n, shape, seed_h), req.nfe, mode=md,
                          cond=req.cond_for(n), heldout_cond=req.cond_for(n), guidance=req.guidance, path=req.path,
                          names=names, rtol=rtol, on_phase=lambda ph: bar.tick(f"n={n} {ph}"), **opts)
        st = res.meta["heldout_stats"]
        history.append({"n": n, "mode": md, "cpu_s": round(time.process_time() - t, 2), "heldout_rmse": st["rmse"],
                        "interval": [st["lo"], st["hi"]], "fallback": res.fallback})
        return res

    # pilots: ls (no back-propagation) first; then, if the budget leaves room, auto, whose gradient fits
    # cost mostly per L-BFGS iteration (they run on at most grad_rows rows)
    res = fit(PILOT_BATCH, "ls" if mode == "auto" else mode)
    c_fit = history[-1]["cpu_s"]
    c_grad, md, grad_rows = 0.0, ("ls" if mode == "auto" else mode), PILOT_BATCH
    scale = _call_cost_scale(_velocity(req.model, req.guidance), shape, req.cond_for)
    if mode == "auto" and c_fit <= 0.15 * budget:
        res_auto = fit(PILOT_BATCH, "auto")
        c_grad = max(0.0, history[-1]["cpu_s"] - c_fit)
        if c_grad <= 0.4 * budget:
            md, res = "auto", res_auto
            while 4 * grad_rows <= 2048 and c_grad * scale(4 * grad_rows) <= 0.4 * budget:
                grad_rows *= 4

    def cost(n: int) -> float:  # the pilot's cost, scaled by what one model call costs at n rows vs 32
        return c_fit * scale(n) + (c_grad * scale(min(n, grad_rows)) if md == "auto" else 0.0)

    left = budget - (time.process_time() - cpu0)
    n = PILOT_BATCH
    while 4 * n <= MAX_BATCH and cost(4 * n) <= 0.6 * left:
        n *= 4
    opts = {**opts, "grad_rows": grad_rows}
    if n > PILOT_BATCH:
        res = fit(n, md)
    while n > PILOT_BATCH:
        stats = res.meta["heldout_stats"]
        rel = (stats["hi"] - stats["lo"]) / (2 * stats["rmse"]) if stats["rmse"] > 0 else 0.0
        if (rel <= STABLE_REL_HALFWIDTH and n >= MIN_STABLE_BATCH) or n >= MAX_BATCH:
            break
        grow = 4 if time.process_time() - cpu0 + 4.4 * history[-1]["cpu_s"] <= budget else 2
        if time.process_time() - cpu0 + 2.2 * history[-1]["cpu_s"] > budget:
            break
        n = min(MAX_BATCH, grow * n)
        res = fit(n, md)
    bar.close()
    sizing = {"self_sized": True, "budget_s": budget, "batch": n, "mode_used": md,
              "cpu_seconds_total": round(time.process_time() - cpu0, 2), "history": history}
    cal = _as_calibration(req, mode, rtol, res, sizing)
    cal.info["cpu_seconds"] = sizing["cpu_seconds_total"]  # the whole sizing, pilot included
    return cal


class _ProgressBar:
    """A tqdm bar over the CPU-second budget (ETA included), advanced as each fit phase ends."""

    def __init__(self, req: CalibrationRequest, budget: float) -> None:
        self.t0 = self.last = time.process_time()
        self.bar = None
        if req.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(budget), unit="CPU s", desc=f"calibrate NFE {req.nfe}", leave=False)

    def tick(self, what: str) -> None:
        if self.bar is not None:
            now = time.process_time()
            self.bar.update(min(now - self.last, max(0.0, self.bar.total - self.bar.n)))
            self.bar.set_postfix_str(what, refresh=True)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _as_calibration(req: CalibrationRequest, mode: str, rtol: float, res: FitResult, sizing: Dict[str, Any]) -> Calibration:
    pick = "init" if res.fallback else "fitted"
    table = res.solver.to_dict()
    table["meta"] = {k: v for k, v in table["meta"].items() if k not in ("fingerprint",)}
    return Calibration(
        kind=mode if mode == "dc" else "learned", solver=req.solver, nfe=res.nfe, times=list(res.solver.times),
        solvers=[], grid="learned", calib_rmse=res.calib_rmse[pick], holdout_rmse=res.heldout_rmse[pick],
        reference={"solver": "dopri5", "rtol": rtol, "dtype": "float64", "holdout_batch": int(res.meta["n_heldout"]),
                   "calib_batch": int(res.meta["n_calib"])},
        info={"mode": mode, "initial_solver": res.initial.meta.get("init"), "fallback": res.fallback,
              "calib_rmse": res.calib_rmse, "holdout_rmse": res.heldout_rmse, "cpu_seconds": res.cpu_seconds,
              "model_calls": res.model_calls, "candidates": res.candidates, "n_params": res.solver.n_params,
              "initial_table": res.initial.to_dict(), "holdout_stats": res.meta["heldout_stats"],
              "p_better": res.meta["p_better"], "sizing": sizing},
        table=table)


@register_calibration_kind("learned", own_reference=True,
                           summary="learned non-stationary multistep table (BNS-style), fitted to a dopri5 reference")
def _calibrate_learned(req: CalibrationRequest) -> Calibration:
    """The learned table (``mode`` option: auto / ls / grad / ls+grad; default auto)."""
    return _fit_request(req, "auto")


@register_calibration_kind("dc", own_reference=True,
                           summary="DC-Solver dynamic compensation of a multistep solver (Zhao et al. 2024)")
def _calibrate_dc(req: CalibrationRequest) -> Calibration:
    """DC-Solver compensation ratios of ``req.solver`` (or of the best candidate with ``"auto"``)."""
    return _fit_request(req, "dc")
