"""Explicit Runge-Kutta methods: the Butcher tableaux and the one step function every fixed-step
RK loop in the library uses (the ODE solvers, the multistep warm-ups, the adjoint, the fast
image sampler, FlowChef's Euler update).

A tableau ``(c, A, b)`` with ``s`` stages advances ``dx/dt = f(x, t)`` from ``(x, t)`` by ``h``:

    k_j = f(x + h sum_{l<j} A_jl k_l,  t + c_j h),   j = 1..s,
    x_next = x + h sum_j b_j k_j.

:func:`rk_step` takes ``t`` and ``h`` either as Python floats (every stage input and the update
are one :func:`~.base.lincomb` each, the solvers' fast path) or as 0-d tensors on the state's
device (the sync-free loop of :mod:`straightflow.images.fast`: no value is ever read back to the
host, so a CUDA stream never waits). Adaptive Dormand-Prince 5(4) keeps its own tableau in
:mod:`.adaptive` (embedded error weights, first-same-as-last).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..registry import Registry
from .base import lincomb
from .protocol import Eval, drive

__all__ = ["Tableau", "TABLEAUX", "EULER", "MIDPOINT", "HEUN", "RK3", "RK4", "rk", "rk_step", "get_tableau", "available"]

Time = Union[float, Tensor]


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit RK method: nodes ``c``, strictly lower-triangular ``a``
    (row ``j`` holds ``A_j1 .. A_j,j-1``), weights ``b``; ``order`` is its classical order."""

    name: str
    order: int
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]

    def __post_init__(self) -> None:
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s or any(len(row) != j for j, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: c, b need one entry per stage and row j of a needs j entries")

    @property
    def stages(self) -> int:
        """Velocity evaluations per step."""
        return len(self.b)


TABLEAUX: Registry = Registry("Runge-Kutta tableau")


def _register(tab: Tableau) -> Tableau:
    return TABLEAUX.register(tab.name)(tab)


EULER = _register(Tableau("euler", 1, (0.0,), ((),), (1.0,)))
"""``x + h k1``."""
MIDPOINT = _register(Tableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)))
"""``x + h f(x + h/2 k1, t + h/2)``."""
HEUN = _register(Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5)))
"""Trapezoidal predictor-corrector: ``x + h/2 (k1 + f(x + h k1, t + h))``."""
RK3 = _register(Tableau("rk3", 3, (0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6)))
"""Kutta's third-order method: ``k3 = f(x + h (2 k2 - k1), t + h)``, ``x + h/6 (k1 + 4 k2 + k3)``."""
RK4 = _register(Tableau("rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                        (1 / 6, 1 / 3, 1 / 3, 1 / 6)))
"""Classic RK4: ``x + h/6 (k1 + 2 k2 + 2 k3 + k4)``."""


def available() -> List[str]:
    """Names of the registered tableaux."""
    return TABLEAUX.names()


def get_tableau(name: str) -> Tableau:
    """The tableau registered as ``name`` (an unknown name raises, listing the valid ones)."""
    return TABLEAUX.get(name)


def _combine(x: Tensor, h: Time, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """``x + h sum_j w_j k_j`` (zero weights skipped): one :func:`lincomb` for a float ``h``,
    device-side products for a 0-d tensor ``h``."""
    if torch.is_tensor(h):
        out = x
        for w, k in zip(weights, ks):
            if w != 0.0:
                out = out + (h * w) * k
        return out
    return lincomb([(1.0, x)] + [(h * w, k) for w, k in zip(weights, ks)])


def rk(x: Tensor, t: Time, h: Time, tableau: Tableau, k1: Optional[Tensor] = None, i: int = -1):
    """One explicit RK step as a solver coroutine (:mod:`.protocol`): ``x + h sum_j b_j k_j`` with
    ``k_j = v(x + h sum_{l<j} a_jl k_l, t + c_j h)``, one :class:`~.protocol.Eval` per stage.

    Compose it with ``x = yield from rk(x, t, h, tableau)``. ``k1 = v(x, t)`` may be given when the
    caller already has it (multistep warm-ups, FlowChef), which saves that evaluation. ``t`` and
    ``h`` are both Python floats or both 0-d tensors (see the module docstring).
    """
    ks = [(yield Eval(x, t, i)) if k1 is None else k1]
    for c, row in zip(tableau.c[1:], tableau.a[1:]):
        ks.append((yield Eval(_combine(x, h, row, ks), t + c * h, i)))
    return _combine(x, h, tableau.b, ks)


def rk_step(f: Callable[[Tensor, Time, int], Tensor], x: Tensor, t: Time, h: Time, tableau: Tableau,
            k1: Optional[Tensor] = None, i: int = -1) -> Tensor:
    """:func:`rk` driven by ``f(x, t, i)`` (called once per stage; ``i`` is passed through for error
    messages): the one-step function for code that holds a velocity function."""
    return drive(rk(x, t, h, tableau, k1, i), f)
