"""Classifier-free guidance with time schedules (Ho & Salimans 2022; Kynkaanniemi et al. 2024;
Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight Schedulers").

``v = v_null + w(t) (v_cond - v_null)`` with ``w(t)`` from a :class:`GuidanceSchedule`:

- ``constant``: ``w(t) = scale``;
- ``linear``:  ``w(t) = w0 + (scale - w0) r(t)``, ``r(t) = (t - a) / (b - a)`` on the ramp ``[a, b]``;
- ``cosine``:  same with ``r(t) = (1 - cos(pi (t - a) / (b - a))) / 2``;
- ``direction="down"`` mirrors the ramp (``r -> 1 - r``): strongest guidance near the noise;
- ``interval=(lo, hi)``: guidance only for ``lo <= t <= hi`` (Kynkaanniemi et al. 2024);
  outside it ``w = 1`` (plain conditional velocity).

NFE counts the batch rows really computed, per sample: ``w(t) == 1`` needs the conditional rows
only, ``w(t) == 0`` the unconditional rows only (1 evaluation each); any other ``w`` runs both
halves in one batch of ``2B`` rows (2 evaluations). ``t = 0`` is noise, ``t = 1`` data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..registry import Registry
from ..solvers.guidance import ClassifierFreeGuidance

__all__ = ["GuidanceSchedule", "ScheduledGuidance", "SCHEDULES", "GUIDANCE_SCHEDULES", "make_guidance"]

_SHAPES = (("constant", lambda r: 1.0), ("linear", lambda r: r),
           ("cosine", lambda r: 0.5 * (1.0 - math.cos(math.pi * r))))
GUIDANCE_SCHEDULES: Registry = Registry("guidance schedule")
"""The ramp shape ``r -> r'`` on ``[0, 1]`` of every schedule, by name (``constant`` has no ramp: ``w = scale``)."""
for _name, _shape in _SHAPES:
    GUIDANCE_SCHEDULES.register(_name)(_shape)

SCHEDULES: Tuple[str, ...] = tuple(name for name, _ in _SHAPES)
"""The schedule names, in the order the docs list them (derived from :data:`GUIDANCE_SCHEDULES`)."""


@dataclass(frozen=True)
class GuidanceSchedule:
    """``w(t)``: ``kind`` in :data:`SCHEDULES`, peak ``scale``, ramp start value ``start``, ramp
    range ``ramp=(a, b)``, ``direction`` ``"up"`` (weak near noise, strong near data) or ``"down"``,
    and an optional ``interval`` outside which ``w = 1``."""

    kind: str = "constant"
    scale: float = 1.0
    start: float = 1.0
    ramp: Tuple[float, float] = (0.0, 1.0)
    direction: str = "up"
    interval: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", GUIDANCE_SCHEDULES.canonical(self.kind))  # unknown: lists the names
        if self.direction not in ("up", "down"):
            raise ValueError(f"guidance schedule direction must be 'up' or 'down', got {self.direction!r}")
        a, b = (float(v) for v in self.ramp)
        if not b > a:
            raise ValueError(f"guidance ramp must be an increasing pair (a, b), got {self.ramp!r}")
        if self.interval is not None:
            lo, hi = (float(v) for v in self.interval)
            if not (0.0 <= lo <= hi <= 1.0):
                raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {self.interval!r}")

    def __call__(self, t: float) -> float:
        t = float(t)
        if self.interval is not None and not (self.interval[0] <= t <= self.interval[1]):
            return 1.0
        if self.kind == "constant":
            return float(self.scale)
        a, b = (float(v) for v in self.ramp)
        r = min(max((t - a) / (b - a), 0.0), 1.0)
        if self.direction == "down":
            r = 1.0 - r
        r = GUIDANCE_SCHEDULES.get(self.kind)(r)
        return float(self.start + (self.scale - self.start) * r)


class ScheduledGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance whose weight follows ``schedule(t)`` (a :class:`GuidanceSchedule`
    or any callable ``t -> w``). Drop-in for :class:`~straightflow.solvers.ClassifierFreeGuidance`
    (``sample(..., guidance=ScheduledGuidance(model, schedule))``); ``evals_per_call`` is set on
    every call to the rows really computed divided by the batch size (1 or 2), ``rows`` sums them.
    """

    def __init__(self, model: Callable, schedule: Union[GuidanceSchedule, Callable[[float], float]]) -> None:
        sched = schedule if callable(schedule) else None
        if sched is None:
            raise TypeError("schedule must be a GuidanceSchedule or a callable t -> w")
        interval = getattr(schedule, "interval", None)
        super().__init__(model, scale=float(getattr(schedule, "scale", 1.0)), interval=interval)
        self.schedule = schedule
        self.calls = 0

    def weight(self, t: float) -> float:
        return float(self.schedule(float(t)))

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, **cond) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels: pass cond={'y': labels}")
        self.calls += 1
        w = self.weight(float(t.reshape(-1)[0]))
        if w == 1.0:  # conditional rows only
            self.evals_per_call = 1
            self.rows += x.shape[0]
            return self.model(x, t, y=y, **cond)
        null = torch.full_like(y, self._null())
        if w == 0.0:  # unconditional rows only
            self.evals_per_call = 1
            self.rows += x.shape[0]
            return self.model(x, t, y=null, **cond)
        self.evals_per_call = 2
        self.rows += 2 * x.shape[0]
        v = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **cond)
        vc, vu = v.chunk(2)
        return vu + w * (vc - vu)


def make_guidance(model: Callable, scale: float = 1.0, schedule: str = "constant", start: float = 1.0,
                  ramp: Tuple[float, float] = (0.0, 1.0), direction: str = "up",
                  interval: Optional[Tuple[float, float]] = None) -> ScheduledGuidance:
    """Convenience: ``ScheduledGuidance(model, GuidanceSchedule(schedule, scale, start, ramp, direction, interval))``."""
    return ScheduledGuidance(model, GuidanceSchedule(schedule, float(scale), float(start), tuple(ramp),
                                                     direction, None if interval is None else tuple(interval)))
