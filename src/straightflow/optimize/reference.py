"""The accurate reference every optimiser is scored against: RK4 on a fine uniform grid.

:func:`reference_trajectory` integrates the calibration batch from noise (t = 0) to data
(t = 1) with classic RK4 on ``fine_steps`` uniform steps, keeping every state ``x_i`` and the
velocity ``v_i = v(x_i, t_i)`` (``4 * fine_steps + 1`` model calls). Between grid points
:meth:`ReferenceTrajectory.at` uses the cubic Hermite spline through ``(x_i, v_i)`` and
``(x_{i+1}, v_{i+1})``, with ``s = (t - t_i) / h``::

    x(t) = h00(s) x_i + h10(s) h v_i + h01(s) x_{i+1} + h11(s) h v_{i+1},
    h00 = 2s^3 - 3s^2 + 1, h10 = s^3 - 2s^2 + s, h01 = -2s^3 + 3s^2, h11 = s^3 - s^2

(error O(h^4), far below any coarse solver's). ``_reference_end`` gives only the endpoint
(the held-out scores need no more).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..solvers import get_solver
from ..solvers.base import CountedVelocity


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
    out = get_solver("rk4").run(f, x, ts)
    return out, f.nfe
