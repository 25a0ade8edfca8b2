"""Multistep solvers: Adams-Bashforth, PNDM/PLMS, heavy-ball momentum (HB, GHVB), FlowTurbo's pseudo-corrector.

All of them reuse velocities from earlier steps, so after a short warm-up they cost one
velocity evaluation (NFE) per step. The warm-up makes the cost of ``steps`` steps differ from
the nominal ``evals_per_step * steps`` of the registry; :func:`exact_nfe` gives the exact count
and :func:`steps_for_nfe` the largest step count within a budget. Every solver here works on
any monotone grid (sampling or inversion); how each treats non-uniform steps is stated in its
docstring.

Notation: ``h_i = t_{i+1} - t_i``, ``f_i = v(x_i, t_i)``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import List, Sequence

from .base import SOLVERS, register_solver
from .protocol import Eval, State
from .rk import HEUN, RK3, RK4, rk

__all__ = ["ab_coefficients", "exact_nfe", "steps_for_nfe", "ab2", "ab3", "ab4", "plms", "hb", "ghvb", "heun_pc"]


# ----------------------------------------------------------------------------- coefficients

def _polymul(p: List[float], q: List[float]) -> List[float]:
    out = [0.0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def ab_coefficients(times: Sequence[float], t_next: float) -> List[float]:
    """Variable-step Adams-Bashforth weights: ``x_{n+1} = x_n + h sum_j b_j f(t_{n-j})``.

    ``times = [t_n, t_{n-1}, ..., t_{n-k+1}]`` (newest first), ``h = t_next - t_n``. The weights
    integrate the Lagrange polynomial through the ``k`` past velocities exactly over
    ``[t_n, t_next]``: ``b_j = (1/h) int_{t_n}^{t_next} L_j(t) dt``. On a uniform grid they are
    the classical ``1``, ``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``.
    """
    h = t_next - times[0]
    r = [(t - times[0]) / h for t in times]  # nodes in units of the step: 0, -h_{n-1}/h, ...
    out = []
    for j, rj in enumerate(r):
        poly, denom = [1.0], 1.0
        for m, rm in enumerate(r):
            if m != j:
                poly = _polymul(poly, [-rm, 1.0])  # (s - r_m), coefficients lowest degree first
                denom *= rj - rm
        out.append(sum(c / (d + 1) for d, c in enumerate(poly)) / denom)  # int_0^1 s^d ds
    return out


# Adams-Bashforth in backward differences (uniform step): x_{n+1} = x_n + h sum_j gamma_j D^j f_n.
_AB_GAMMA = (1.0, 1.0 / 2, 5.0 / 12, 3.0 / 8, 251.0 / 720)


def _ghvb_weights(m: int, beta: float) -> List[float]:
    """Weights on ``(v_{n+1}, v_n, ...)`` of GHVB's update ``sum_{j<m} (c_j / beta) D^j v_{n+1}``.

    ``c_0 = beta``, ``c_j = beta gamma_j + (1 - beta) gamma_{j-1}`` (Wizadwongsa et al., eq. 16).
    """
    w = [0.0] * m
    for j in range(m):
        c = beta * _AB_GAMMA[j] + ((1.0 - beta) * _AB_GAMMA[j - 1] if j > 0 else 0.0)
        for i in range(j + 1):  # D^j = sum_i (-1)^i C(j, i) shift^i
            w[i] += (c / beta) * (-1) ** i * math.comb(j, i)
    return w


# ----------------------------------------------------------------------------- Runge-Kutta warm-up

_WARMUP_RK = {2: HEUN, 3: RK3, 4: RK4}  # the warm-up's explicit RK of each order (Heun, Kutta, classic)


def _warmup_plan(k: int, warmup: str, steps: int) -> List[tuple]:
    """Per step ``i``: ``("rk", order)`` or ``("ab", order)`` for an order-``k`` AB method."""
    if warmup not in ("minimal", "rk4"):
        raise ValueError(f"warmup must be 'minimal' or 'rk4', got {warmup!r}")
    plan = []
    for i in range(steps):
        if i >= k - 1:
            plan.append(("ab", k))
        elif warmup == "rk4":
            plan.append(("rk", 4))
        elif i < k - 2:  # needs local error O(h^{k}): an RK of order k - 1
            plan.append(("rk", k - 1))
        else:  # step k - 2 has k - 1 past velocities: AB of order k - 1 is enough
            plan.append(("ab", k - 1))
    return plan


def _check_steps(steps: int) -> int:
    n = int(steps)
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return n


def _adams_cost(k: int, steps: int, warmup: str = "minimal", **_) -> int:
    """Exact NFE of an order-``k`` Adams method: 1 per AB step, ``order`` per RK warm-up step
    (``ab3`` 10 steps = 11 NFE, ``plms`` 20 steps = 29 NFE)."""
    return sum(1 if kind == "ab" else order for kind, order in _warmup_plan(k, warmup, _check_steps(steps)))


def _plms_cost(steps: int, **_) -> int:
    return _adams_cost(4, steps, "rk4")


def _heun_pc_cost(steps: int, exact_steps: int = 1, **_) -> int:
    n, e = _check_steps(steps), int(exact_steps)
    return 2 * n if n <= e else n + e


def _adams(x, ts, k: int, warmup: str):
    hist_t, hist_f = [], []
    for i, (kind, order) in enumerate(_warmup_plan(k, warmup, len(ts) - 1)):
        t, h = ts[i], ts[i + 1] - ts[i]
        hist_t.insert(0, t)
        hist_f.insert(0, (yield Eval(x, t, i)))
        del hist_t[k:], hist_f[k:]
        if kind == "rk":
            x = yield from rk(x, t, h, _WARMUP_RK[order], k1=hist_f[0], i=i)
        else:
            b = ab_coefficients(hist_t[:order], ts[i + 1])
            x = x + h * sum(bj * fj for bj, fj in zip(b, hist_f[:order]))
        yield State(i + 1, ts[i + 1], x)
    return x


# ----------------------------------------------------------------------------- Adams-Bashforth

@register_solver("ab2", order=2, evals_per_step=1, aliases=("adams_bashforth2",),
                 cost=partial(_adams_cost, 2))
def ab2(x, ts, warmup: str = "minimal"):
    """Adams-Bashforth 2 with variable steps: ``x_{n+1} = x_n + h_n (b_0 f_n + b_1 f_{n-1})``.

    ``b_0 = 1 + h_n / (2 h_{n-1})``, ``b_1 = -h_n / (2 h_{n-1})`` (``(3, -1)/2`` on a uniform grid),
    from :func:`ab_coefficients`, so the method stays second order on any smooth grid. Warm-up
    (``warmup="minimal"``): one Euler step (its ``O(h^2)`` local error keeps global order 2);
    exactly 1 NFE per step. ``warmup="rk4"``: the first step by RK4 (3 NFE more).
    """
    return _adams(x, ts, 2, warmup)


@register_solver("ab3", order=3, evals_per_step=1, aliases=("adams_bashforth3",),
                 cost=partial(_adams_cost, 3))
def ab3(x, ts, warmup: str = "minimal"):
    """Adams-Bashforth 3 with variable steps: ``x_{n+1} = x_n + h_n sum_{j<3} b_j f_{n-j}``.

    Weights from :func:`ab_coefficients` (``(23, -16, 5)/12`` on a uniform grid). Warm-up
    (``"minimal"``): step 0 by Heun (RK2, +1 NFE), step 1 by AB2, then AB3: ``steps + 1`` NFE, global
    order 3 kept. ``warmup="rk4"``: the first two steps by RK4 (``steps + 6`` NFE).
    """
    return _adams(x, ts, 3, warmup)


@register_solver("ab4", order=4, evals_per_step=1, aliases=("adams_bashforth4",),
                 cost=partial(_adams_cost, 4))
def ab4(x, ts, warmup: str = "minimal"):
    """Adams-Bashforth 4 with variable steps: ``x_{n+1} = x_n + h_n sum_{j<4} b_j f_{n-j}``.

    Weights from :func:`ab_coefficients` (``(55, -59, 37, -9)/24`` on a uniform grid). Warm-up
    (``"minimal"``): steps 0-1 by Kutta's RK3 (+2 NFE each), step 2 by AB3, then AB4: ``steps + 4``
    NFE, global order 4 kept. ``warmup="rk4"``: three RK4 steps, i.e. :func:`plms`.
    """
    return _adams(x, ts, 4, warmup)


@register_solver("plms", order=4, evals_per_step=1, aliases=("pndm",), cost=_plms_cost)
def plms(x, ts):
    """PNDM's pseudo linear multistep (Liu et al. 2022): three RK4 warm-up steps, then 4th-order AB.

    ``x_{n+1} = x_n + h/24 (55 f_n - 59 f_{n-1} + 37 f_{n-2} - 9 f_{n-3})`` on a uniform grid; on a
    non-uniform grid the variable-step AB4 weights (:func:`ab_coefficients`) replace the paper's
    uniform ones, so order 4 holds there too. For a velocity field the paper's pseudo-RK warm-up
    is plain RK4. Cost: ``4 * steps`` NFE for ``steps <= 3``, else ``steps + 9`` (the RK4 first
    stages are the AB history).
    """
    return _adams(x, ts, 4, "rk4")


# ----------------------------------------------------------------------------- momentum

def _momentum_number(order: float):
    order = float(order)
    if not 0 < order <= len(_AB_GAMMA):
        raise ValueError(f"GHVB order (momentum number) must be in (0, {len(_AB_GAMMA)}], got {order}")
    k = math.ceil(order - 1e-12)
    beta = order - (k - 1)
    return k, beta


def _momentum(x, ts, k: int, beta: float, generalized: bool):
    v = None
    hist: List = []  # GHVB: momentum values newest first; HB: velocities newest first
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        fi = yield Eval(x, ts[i], i)
        if generalized:
            v = fi if v is None else (1 - beta) * v + beta * fi
            hist.insert(0, v)
            del hist[k:]
            w = _ghvb_weights(len(hist), beta)
            x = x + h * sum(wj * vj for wj, vj in zip(w, hist))
        else:
            hist.insert(0, fi)
            del hist[k:]
            m = len(hist)
            p = sum(bj * fj for bj, fj in zip(_ab_uniform(m), hist))
            v = p if v is None else (1 - beta) * v + beta * p
            x = x + h * v
        yield State(i + 1, ts[i + 1], x)
    return x


def _ab_uniform(m: int) -> List[float]:
    return ab_coefficients([-float(j) for j in range(m)], 1.0)


@register_solver("hb", order=1, evals_per_step=1, aliases=("heavy_ball", "euler_hb"))
def hb(x, ts, beta: float = 0.8, order: int = 1):
    """Heavy-ball momentum (Wizadwongsa et al. 2023, "Diffusion Sampling with Momentum", eq. 13-14).

    ``v_{n+1} = (1 - beta) v_n + beta P_n``, ``x_{n+1} = x_n + h_n v_{n+1}`` with ``v_1 = P_0`` and
    ``P_n = f_n`` (``order=1``: Euler with HB) or the uniform-step AB-``order`` combination of the
    last velocities (PLMS with HB, lower orders while the history fills). ``beta = 1`` is the plain
    method; the default 0.8 is the paper's "Euler with HB" setting (GHVB 0.8). For ``beta < 1``
    the method is first order whatever ``order`` (their Theorem 1). The averaging ignores step
    sizes, which a first-order method can afford on any grid.
    """
    if not 0 < beta <= 1:
        raise ValueError(f"hb: beta (damping coefficient) must be in (0, 1], got {beta}")
    if order not in (1, 2, 3, 4):
        raise ValueError(f"hb: order must be 1, 2, 3 or 4, got {order}")
    return _momentum(x, ts, int(order), float(beta), generalized=False)


@register_solver("ghvb", order=2, evals_per_step=1, aliases=("generalized_heavy_ball",))
def ghvb(x, ts, order: float = 1.5):
    """Generalized heavy ball, GHVB (Wizadwongsa et al. 2023, eq. 16-19): momentum *before* the AB sum.

    Momentum number ``order = k - 1 + beta`` in (0, 5] (``k = ceil(order)``, ``0 < beta <= 1``):
    ``v_{n+1} = (1 - beta) v_n + beta f_n``, ``x_{n+1} = x_n + h_n sum_{j<k} (c_j / beta) D^j v_{n+1}``
    with ``D`` the backward difference, ``c_0 = beta``, ``c_j = beta gamma_j + (1 - beta) gamma_{j-1}``
    and ``gamma = (1, 1/2, 5/12, 3/8, ...)`` the AB coefficients; e.g. ``k = 2``:
    ``x_{n+1} = x_n + h ((2 + beta) v_{n+1} - (2 - beta) v_n) / (2 beta)``. Integer orders are
    PLMS (AB-k) with an Euler/lower-order start; ``order -> k - 1`` tends to AB-(k-1); ``0 < order
    <= 1`` is Euler with HB. As in the paper the start uses lower orders while the history fills
    (``v_1 = f_0``, first step Euler), so the observed order is at most 2 (the ``O(h)`` start-up of
    the momentum is not corrected; measured: 1.5, 2.5 and 3.5 all give ~2 on the oracle). The
    weights assume uniform steps: on a smoothly varying grid (step ratios ``1 + O(h)``) the order
    is kept, on a grid whose step ratios jump (e.g. alternating h, 2h) it drops to 1.
    """
    k, beta = _momentum_number(order)
    return _momentum(x, ts, k, beta, generalized=True)


# ----------------------------------------------------------------------------- FlowTurbo

@register_solver("heun_pc", order=2, evals_per_step=1, aliases=("flowturbo", "pseudo_corrector"),
                 cost=_heun_pc_cost)
def heun_pc(x, ts, exact_steps: int = 1):
    """Heun with FlowTurbo's pseudo corrector (Zhao et al. 2024, "FlowTurbo"): 1 NFE per step.

    ``x~ = x_i + h d_i``, ``d' = v(x~, t_{i+1})``, ``x_{i+1} = x_i + h/2 (d_i + d')`` and the next step
    reuses ``d_{i+1} = d'`` (the velocity at the *predicted* point) instead of ``v(x_{i+1}, t_{i+1})``.
    Since ``x~ - x_{i+1} = O(h^2)`` the method stays second order. The first ``exact_steps`` steps
    (>= 1; FlowTurbo's ``N_H``) are plain Heun. Cost: ``steps + exact_steps`` NFE
    (``2 * steps`` if ``steps <= exact_steps``).
    """
    if int(exact_steps) < 1:
        raise ValueError(f"heun_pc: exact_steps must be >= 1, got {exact_steps}")
    d = None
    for i in range(len(ts) - 1):
        t, h = ts[i], ts[i + 1] - ts[i]
        if d is None or i < exact_steps:
            d = yield Eval(x, t, i)
        d_next = yield Eval(x + h * d, ts[i + 1], i)
        x = x + 0.5 * h * (d + d_next)
        d = d_next
        yield State(i + 1, ts[i + 1], x)
    return x


# ----------------------------------------------------------------------------- exact cost

def _fixed_step(solver: str):
    spec = SOLVERS.get(solver)
    if spec.adaptive:
        raise ValueError(f"{spec.name} is adaptive: its cost is known only after the solve (SampleResult.nfe)")
    return spec


def exact_nfe(solver: str, steps: int, **options) -> int:
    """Exact velocity evaluations of any registered fixed-step ``solver`` for ``steps`` steps
    (``SolverSpec.nfe``: ``cost(steps, **options)`` where declared, else ``evals_per_step * steps``)."""
    return _fixed_step(solver).nfe(int(steps), **options)


def steps_for_nfe(solver: str, nfe: int, **options) -> int:
    """Largest step count of a fixed-step ``solver`` whose exact cost does not exceed ``nfe`` (at least 1)."""
    return _fixed_step(solver).steps_for_nfe(nfe, **options)
