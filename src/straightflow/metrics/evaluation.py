"""The metric registry, data-vs-data floors and :func:`evaluate`.

``METRICS`` names every metric with its display name and kind: ``"distribution"`` (two
sample sets: ``w2``, ``sliced_w2``, ``mmd``, ``fd``), ``"paired"`` (images against their
references: ``psnr``, ``ssim``) or ``"trajectory"`` (``straightness``).

:func:`evaluate` reports a distribution metric with its *floor*: the same metric between two
disjoint halves of the held-out data at the same sample size ``m``, i.e. what a perfect
sampler would read. :class:`MetricReport` prints ``W2 = 0.123 (floor 0.045, 2.7x)`` with
``ratio = value / floor``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..registry import Registry
from .arrays import ArrayLike
from .distances import mmd, sliced_w2, straightness, w2
from .frechet import classifier_fd
from .images import psnr, ssim


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: display name, kind and the function."""

    name: str
    display: str
    kind: str  # "distribution" (two sample sets), "paired" (x vs its reference), "trajectory"
    fn: Callable[..., float]


METRICS: Registry = Registry("metric")


def _reg(name: str, display: str, kind: str, fn: Callable[..., float], aliases: Sequence[str] = ()) -> None:
    METRICS.register(name, aliases=aliases)(MetricSpec(name, display, kind, fn))


_reg("w2", "W2", "distribution", lambda a, b, seed=0, **kw: w2(a, b, seed=seed, **kw), ("wasserstein",))
_reg("sliced_w2", "SW2", "distribution", lambda a, b, seed=0, **kw: sliced_w2(a, b, seed=seed, **kw),
     ("sw2", "sliced"))
_reg("mmd", "MMD^2", "distribution", lambda a, b, seed=0, **kw: mmd(a, b, **kw))
_reg("fd", "FD", "distribution",
     lambda a, b, seed=0, extractor="digits", **kw: classifier_fd(a, b, extractor=extractor, **kw),
     ("classifier_fd",))
_reg("psnr", "PSNR", "paired", psnr)
_reg("ssim", "SSIM", "paired", ssim)
_reg("straightness", "S", "trajectory", straightness)


def available(kind: Optional[str] = None) -> list:
    """Registered metric names (optionally only one kind: distribution/paired/trajectory)."""
    return [n for n in METRICS.names() if kind is None or METRICS.get(n).kind == kind]


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.3g}"  # 0.123, 0.045, 12.3, 1536.2, 0.000201


@dataclass
class MetricReport:
    """A metric value with its data-vs-data floor: ``W2 = 0.123 (floor 0.045, 2.7x)``.

    ``ratio = value / floor`` (``inf`` for a zero floor and a positive value, ``nan`` for
    0/0). A ratio near 1 means the samples are as close to the data as the data is to itself.
    """

    name: str
    value: float
    floor: float
    n: int = 0
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.value, self.floor = float(self.value), float(self.floor)
        if self.floor != 0:
            self.ratio = self.value / self.floor
        else:
            self.ratio = float("nan") if self.value == 0 else math.copysign(float("inf"), self.value)

    def __str__(self) -> str:
        r = f"{self.ratio:.1f}x" if math.isfinite(self.ratio) else f"{self.ratio}x"
        return f"{self.name} = {_fmt(self.value)} (floor {_fmt(self.floor)}, {r})"

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "value": self.value, "floor": self.floor, "ratio": self.ratio, "n": self.n}


def evaluate(
    samples: ArrayLike,
    data: ArrayLike,
    metric: str = "w2",
    seed: int = 0,
    extractor: Union[str, nn.Module] = "digits",
    floor_data: Optional[ArrayLike] = None,
    **kwargs: Any,
) -> MetricReport:
    """A distribution metric between ``samples`` and held-out ``data``, with its floor.

    With ``floor_data`` (other real data, e.g. the training split of a fixed data set whose
    held-out part is ``data``): ``m = min(len(samples), len(data), len(floor_data))``, value =
    metric(samples[:m], data[:m]) and floor = metric(floor_data[:m], data[:m]) (each taken in a
    seeded random order), so the whole held-out set is the reference. Otherwise:

    ``data`` (a held-out reference set, at least 4 points) is shuffled with ``seed`` and cut
    into two disjoint halves. With ``m = min(len(samples), len(data) // 2)``:

    - value = metric(samples[:m], first half[:m]) (``samples`` are taken in a seeded random
      order when there are more than ``m``);
    - floor = metric(first half[:m], second half[:m]) -- data vs data at the same size.

    Both use the same ``m`` and ``seed``, so the floor is what the metric reads for a perfect
    sampler at this sample size. ``metric``: one of ``available("distribution")``
    (``w2``, ``sliced_w2``, ``mmd``, ``fd``); ``extractor`` is used by ``fd``; extra
    ``kwargs`` go to the metric function (e.g. ``max_n`` for ``w2``).
    """
    spec: MetricSpec = METRICS.get(metric)
    if spec.kind != "distribution":
        raise ValueError(
            f"evaluate compares sample sets; {metric!r} is a {spec.kind} metric. "
            f"Use one of: {', '.join(available('distribution'))}"
        )
    s = torch.as_tensor(samples) if not isinstance(samples, np.ndarray) else torch.from_numpy(samples)
    d = torch.as_tensor(data) if not isinstance(data, np.ndarray) else torch.from_numpy(data)
    if s.shape[1:] != d.shape[1:]:
        raise ValueError(f"samples {tuple(s.shape)} and data {tuple(d.shape)} differ in shape")
    extra = dict(kwargs)
    if spec.name == "fd":
        extra["extractor"] = extractor
    if floor_data is not None:
        f = torch.as_tensor(floor_data) if not isinstance(floor_data, np.ndarray) else torch.from_numpy(floor_data)
        if f.shape[1:] != d.shape[1:]:
            raise ValueError(f"floor_data {tuple(f.shape)} and data {tuple(d.shape)} differ in shape")
        m = min(s.shape[0], d.shape[0], f.shape[0])
        if m < 2:
            raise ValueError(f"evaluate needs >= 2 samples, reference and floor points, got {s.shape[0]}, "
                             f"{d.shape[0]} and {f.shape[0]}")
        g = torch.Generator().manual_seed(seed)
        a = d[torch.randperm(d.shape[0], generator=g)[:m]]
        b = f[torch.randperm(f.shape[0], generator=g)[:m]]
        s = s[torch.randperm(s.shape[0], generator=g)[:m]]
        return MetricReport(spec.display, spec.fn(s, a, seed=seed, **extra), spec.fn(b, a, seed=seed, **extra), n=m)
    half = d.shape[0] // 2
    m = min(s.shape[0], half)
    if m < 2:
        raise ValueError(
            f"evaluate needs >= 2 samples and >= 4 data points to split, got {s.shape[0]} and {d.shape[0]}"
        )
    g = torch.Generator().manual_seed(seed)
    dp = d[torch.randperm(d.shape[0], generator=g)]
    a, b = dp[:m], dp[half : half + m]
    if s.shape[0] > m:
        s = s[torch.randperm(s.shape[0], generator=g)[:m]]
    value = spec.fn(s, a, seed=seed, **extra)
    floor = spec.fn(a, b, seed=seed, **extra)
    return MetricReport(spec.display, value, floor, n=m)
