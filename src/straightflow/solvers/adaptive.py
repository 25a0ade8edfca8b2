"""Adaptive Dormand-Prince 5(4): the reference solver for benchmarks.

The grid only gives the interval and the times at which the state is reported: the solver picks
its own steps from the error estimate, so its cost is whatever ``f`` counts (``res.nfe``), not
``evals_per_step * steps``. Run it in float64 for references: in float32 tolerances below about
1e-6 are not reachable. Registered with ``adaptive=True``: :func:`.multistep.exact_nfe` refuses it.
"""
from __future__ import annotations

import math

import torch

from .base import register_solver
from .protocol import Eval, State

__all__ = ["dopri5"]

# Dormand & Prince (1980) tableau; the 5th-order weights are the last row of A (FSAL). It stays here,
# not in .rk: the step needs the embedded error weights _E and reuses its last stage (FSAL), which
# rk.rk_step (one fixed-step update) does not do.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# error weights: 5th-order minus embedded 4th-order solution
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

_SAFETY, _FAC_MIN, _FAC_MAX = 0.9, 0.2, 10.0
_BETA = 0.04  # PI controller (Hairer, Norsett & Wanner II, sec. IV.2): err^-(0.2 - 0.75 beta) * err_old^beta
_ALPHA = 0.2 - 0.75 * _BETA


def _err_norm(e, x0, x1, rtol, atol):
    """Per-sample RMS of ``e / (atol + rtol max(|x0|, |x1|))``, max over the batch."""
    sc = (atol + rtol * torch.maximum(x0.abs(), x1.abs())).clamp_min(torch.finfo(x0.dtype).tiny)
    r = (e / sc).reshape(e.shape[0], -1) if e.ndim > 1 else (e / sc).reshape(1, -1)
    return float(r.pow(2).mean(dim=1).sqrt().max())


def _rms(x):
    return float(x.reshape(x.shape[0], -1).pow(2).mean(dim=1).sqrt().max()) if x.ndim > 1 else float(x.pow(2).mean().sqrt())


def _starting_step(x, t: float, t_end: float, k1, rtol: float, atol: float):
    """Hairer's starting step size (one probe evaluation; Hairer, Norsett & Wanner I, sec. II.4)."""
    direction = 1.0 if t_end > t else -1.0
    sc = (atol + rtol * x.abs()).clamp_min(torch.finfo(x.dtype).tiny)
    d0, d1 = _rms(x / sc), _rms(k1 / sc)
    h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h = min(h, abs(t_end - t))
    k_probe = yield Eval(x + direction * h * k1, t + direction * h, 0)
    d2 = _rms((k_probe - k1) / sc) / h
    h1 = max(1e-6, h * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return max(min(100 * h, h1), 1e-6 * abs(t_end - t))  # floor: pure rtol at x = 0 has no scale


def _stages(x, t: float, hs: float, k1, t_next: float, i: int):
    """The six new stages of one step of size ``hs`` from ``(x, t)`` (the first, ``k1``, is given:
    FSAL); returns the 5th-order solution (where stage 7 is evaluated) and all seven stages."""
    ks = [k1]
    for j in range(1, 7):
        xj = x + hs * sum(a * kk for a, kk in zip(_A[j], ks) if a != 0.0)
        ks.append((yield Eval(xj, t + _C[j] * hs if j < 6 else t_next, i)))
    return xj, ks


@register_solver("dopri5", order=5, evals_per_step=6, aliases=("dormand_prince", "rk45"), adaptive=True)
def dopri5(x, ts, rtol: float = 1e-5, atol: float = 1e-5, h0: float = None,
           max_steps: int = 100_000, hit_grid: bool = True):
    """Adaptive Dormand-Prince 5(4) (Dormand & Prince 1980) with FSAL and a PI step-size controller.

    Each step ``x_{n+1} = x_n + h sum_j b_j k_j`` (7 stages, the last is ``v(x_{n+1}, t_n + h)`` and is
    reused as the next step's first stage: 6 NFE per accepted or rejected step). The local error
    ``h sum_j e_j k_j`` (5th minus embedded 4th order) is measured per sample as the RMS of
    ``err / (atol + rtol max(|x_n|, |x_{n+1}|))`` and the worst sample of the batch decides
    (one step size for the batch); a step is accepted when that is <= 1, and the next step is
    ``h * clip(0.9 err^-0.17 err_prev^0.04, 0.2, 10)`` (no growth right after a rejection). The first
    step follows Hairer's starting-step heuristic (1 extra NFE) unless ``h0`` is given.

    ``hit_grid=True`` (default): steps are shortened to land exactly on every grid time and
    a ``State`` report gives the state there (the trajectory has one entry per grid time; a grid of N
    steps costs at least N solver steps). ``hit_grid=False``: only the first and last grid times
    matter; the solver runs straight through and reports the state once, at the end.
    Works in both directions (inversion integrates backwards). Raises ``RuntimeError`` past
    ``max_steps`` steps or when the step size underflows.
    """
    if rtol <= 0 or atol < 0:
        raise ValueError(f"dopri5 needs rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
    stops = list(range(1, len(ts))) if hit_grid else [len(ts) - 1]
    t, t_end = float(ts[0]), float(ts[-1])
    direction = 1.0 if t_end > t else -1.0
    k1 = yield Eval(x, t, 0)
    h = (yield from _starting_step(x, t, t_end, k1, rtol, atol)) if h0 is None else abs(float(h0))
    err_old, rejected, n_steps = 1e-4, False, 0
    for stop in stops:
        t_stop = float(ts[stop])
        while direction * (t_stop - t) > 0:
            n_steps += 1
            if n_steps > max_steps:
                raise RuntimeError(f"dopri5: more than max_steps={max_steps} steps (t = {t:.6g}); "
                                   "loosen rtol/atol or raise max_steps")
            last = abs(t_stop - t) <= h * (1 + 1e-10)
            step = abs(t_stop - t) if last else h
            if step < 1e-14 * max(1.0, abs(t)):
                raise RuntimeError(f"dopri5: step size underflow at t = {t:.6g} (h = {step:.3g})")
            hs = direction * step
            x_new, ks = yield from _stages(x, t, hs, k1, t_stop if last else t + hs, stop - 1)
            err = _err_norm(hs * sum(e * kk for e, kk in zip(_E, ks) if e != 0.0), x, x_new, rtol, atol)
            if not math.isfinite(err):
                err = float("inf")
            if err <= 1.0:
                t = t_stop if last else t + hs
                x, k1 = x_new, ks[6]
                fac = _FAC_MAX if err == 0 else _SAFETY * err ** -_ALPHA * err_old ** _BETA
                fac = min(_FAC_MAX, max(_FAC_MIN, fac))
                if rejected:
                    fac = min(fac, 1.0)
                # a step shortened to land on the grid does not lower the proposal
                h = max(h, step * fac) if last else step * fac
                err_old, rejected = max(err, 1e-4), False
            else:
                fac = 0.2 if not math.isfinite(err) else max(_FAC_MIN, _SAFETY * err ** -0.2)
                h = step * fac
                rejected = True
        yield State(stop, ts[stop], x)
    return x
