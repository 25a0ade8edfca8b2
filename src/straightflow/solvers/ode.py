"""Classic one-step ODE solvers on a time grid (Euler, midpoint, Heun, RK4).

Each function integrates ``dx/dt = v(x, t)`` over ``ts`` with ``h = t_{i+1} - t_i`` and calls
``callback(i + 1, t_{i+1}, x)`` after each step.
"""
from __future__ import annotations

import torch

from .base import SOLVERS, register_solver


@register_solver("euler", order=1, evals_per_step=1)
def euler(f, x, ts, callback=None):
    """Euler: ``x_{i+1} = x_i + h v(x_i, t_i)`` (the rectified-flow sampler, Liu et al. 2022)."""
    for i in range(len(ts) - 1):
        x = torch.add(x, f(x, ts[i], i), alpha=ts[i + 1] - ts[i])  # one fused pass
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x


@register_solver("midpoint", order=2, evals_per_step=2, aliases=("rf_solver", "rf-solver"))
def midpoint(f, x, ts, callback=None):
    """Explicit midpoint: ``x_{i+1} = x_i + h v(x_i + h/2 v(x_i, t_i), t_i + h/2)``.

    This is RF-Solver's second-order update (Wang et al. 2024, "Taming Rectified Flow").
    """
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        k1 = f(x, ts[i], i)
        x = x + h * f(x + 0.5 * h * k1, ts[i] + 0.5 * h, i)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x


@register_solver("heun", order=2, evals_per_step=2)
def heun(f, x, ts, callback=None, final_euler: bool = False):
    """Heun (trapezoidal predictor-corrector): ``x~ = x_i + h k1``, ``x_{i+1} = x_i + h/2 (k1 + v(x~, t_{i+1}))``.

    ``final_euler=True`` takes a first-order last step (as Karras et al. 2022 do when the last
    time is singular); it then costs one evaluation less.
    """
    n = len(ts) - 1
    for i in range(n):
        h = ts[i + 1] - ts[i]
        k1 = f(x, ts[i], i)
        if final_euler and i == n - 1:
            x = x + h * k1
        else:
            k2 = f(x + h * k1, ts[i + 1], i)
            x = x + 0.5 * h * (k1 + k2)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x


SOLVERS.get("heun").cost = lambda steps, final_euler=False, **_: 2 * steps - (1 if final_euler else 0)


@register_solver("rk4", order=4, evals_per_step=4)
def rk4(f, x, ts, callback=None):
    """Classic 4th-order Runge-Kutta: ``x_{i+1} = x_i + h/6 (k1 + 2 k2 + 2 k3 + k4)``."""
    for i in range(len(ts) - 1):
        t, h = ts[i], ts[i + 1] - ts[i]
        k1 = f(x, t, i)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h, i)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h, i)
        k4 = f(x + h * k3, t + h, i)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x
