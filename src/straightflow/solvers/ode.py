"""Classic one-step ODE solvers on a time grid (Euler, midpoint, Heun, RK4).

Each integrates ``dx/dt = v(x, t)`` over ``ts`` with ``h = t_{i+1} - t_i``, one
:func:`~.rk.rk` step of its Butcher tableau per step, and reports ``State(i + 1, t_{i+1}, x)``
after each step (:mod:`.protocol`).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .base import register_solver
from .protocol import SolverCoroutine, State
from .rk import EULER, HEUN, MIDPOINT, RK4, Tableau, rk


def _rk(x: Tensor, ts: Sequence[float], tableau: Tableau, last: Optional[Tableau] = None) -> SolverCoroutine:
    """Every step by ``tableau`` (the last one by ``last`` when given)."""
    n = len(ts) - 1
    for i in range(n):
        tab = last if (last is not None and i == n - 1) else tableau
        x = yield from rk(x, ts[i], ts[i + 1] - ts[i], tab, i=i)
        yield State(i + 1, ts[i + 1], x)
    return x


@register_solver("euler", order=1, evals_per_step=1)
def euler(x: Tensor, ts: Sequence[float]) -> SolverCoroutine:
    """Euler: ``x_{i+1} = x_i + h v(x_i, t_i)`` (the rectified-flow sampler, Liu et al. 2022)."""
    return _rk(x, ts, EULER)


@register_solver("midpoint", order=2, evals_per_step=2, aliases=("rf_solver", "rf-solver"))
def midpoint(x: Tensor, ts: Sequence[float]) -> SolverCoroutine:
    """Explicit midpoint: ``x_{i+1} = x_i + h v(x_i + h/2 v(x_i, t_i), t_i + h/2)``.

    This is RF-Solver's second-order update (Wang et al. 2024, "Taming Rectified Flow").
    """
    return _rk(x, ts, MIDPOINT)


def _heun_cost(steps: int, final_euler: bool = False, **_) -> int:
    return 2 * steps - (1 if final_euler else 0)


@register_solver("heun", order=2, evals_per_step=2, cost=_heun_cost)
def heun(x: Tensor, ts: Sequence[float], final_euler: bool = False) -> SolverCoroutine:
    """Heun (trapezoidal predictor-corrector): ``x~ = x_i + h k1``, ``x_{i+1} = x_i + h/2 (k1 + v(x~, t_{i+1}))``.

    ``final_euler=True`` takes a first-order last step (as Karras et al. 2022 do when the last
    time is singular); it then costs one evaluation less.
    """
    return _rk(x, ts, HEUN, last=EULER if final_euler else None)


@register_solver("rk4", order=4, evals_per_step=4)
def rk4(x: Tensor, ts: Sequence[float]) -> SolverCoroutine:
    """Classic 4th-order Runge-Kutta: ``x_{i+1} = x_i + h/6 (k1 + 2 k2 + 2 k3 + k4)``."""
    return _rk(x, ts, RK4)
