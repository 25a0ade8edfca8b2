"""Training-time distributions p(t) on [0, 1] (t = 0 noise, t = 1 data).

Each distribution samples with a ``torch.Generator`` (seeded, reproducible) and gives its
density, so plots and tests can check the sampler against the formula.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from .registry import Registry

TIME_DISTS: Registry = Registry("time distribution")


def _uniform(n: int, generator: Optional[torch.Generator], device=None, dtype=torch.float32) -> Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=dtype)


class TimeDistribution(ABC):
    """Base class: ``sample(n, generator)`` -> (n,) times in [0, 1]; ``density(t)``."""

    name = "time"

    @abstractmethod
    def sample(self, n: int, generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32) -> Tensor: ...

    @abstractmethod
    def density(self, t: Tensor) -> Tensor: ...

    def config(self) -> Dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


@TIME_DISTS.register("uniform")
class Uniform(TimeDistribution):
    """``t ~ U[0, 1]`` (Rectified Flow, Flow Matching)."""

    name = "uniform"

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        return _uniform(n, generator, device, dtype)

    def density(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))


@TIME_DISTS.register("logit_normal", aliases=("lognorm", "logit-normal", "lognormal"))
class LogitNormal(TimeDistribution):
    """``t = sigmoid(m + s * n), n ~ N(0, 1)`` (SD3, Esser et al. 2024, eq. 19)."""

    name = "logit_normal"

    def __init__(self, m: float = 0.0, s: float = 1.0) -> None:
        if s <= 0:
            raise ValueError(f"logit_normal needs s > 0, got {s}")
        self.m, self.s = float(m), float(s)

    def config(self):
        return {"name": self.name, "m": self.m, "s": self.s}

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(self.m + self.s * z)

    def density(self, t):
        t = torch.as_tensor(t, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        logit = torch.log(t / (1 - t))
        return torch.exp(-((logit - self.m) ** 2) / (2 * self.s**2)) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))


@TIME_DISTS.register("mode", aliases=("mode_sampling", "cosmap_mode"))
class ModeSampling(TimeDistribution):
    """SD3 mode sampling with heavy tails (Esser et al. 2024, eq. 20), in noise time ``u``:
    ``f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)``; we return ``t = 1 - f(u)``.  Needs
    ``-1 <= s <= 2 / (pi - 2)`` for ``f`` to be monotone; ``s = 0`` is uniform.
    """

    name = "mode"

    def __init__(self, s: float = 1.29) -> None:
        if not -1.0 <= s <= 2 / (math.pi - 2):
            raise ValueError(f"mode sampling needs -1 <= s <= {2 / (math.pi - 2):.4f}, got {s}")
        self.s = float(s)

    def config(self):
        return {"name": self.name, "s": self.s}

    def _f(self, u):
        return 1 - u - self.s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        u = _uniform(n, generator, device, dtype)
        return 1 - self._f(u)

    def density(self, t):
        # t = 1 - f(u) is increasing in u; density = 1 / (dt/du) at u = inverse(t), by bisection.
        t = torch.as_tensor(t, dtype=torch.float64)
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = (lo + hi) / 2
            below = (1 - self._f(mid)) < t
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        u = (lo + hi) / 2
        dtdu = 1 + self.s * (1 - math.pi / 2 * torch.sin(math.pi * u))
        return 1 / dtdu


@TIME_DISTS.register("u_shaped", aliases=("ushaped", "u-shaped"))
class UShaped(TimeDistribution):
    """U-shaped ``p(t) = C/2 (e^{a t} + e^{a (1 - t)})``, ``C = a / (e^a - 1)``, a = 4
    (Lee et al. 2024, "Improving the Training of Rectified Flows"): more weight at both ends.
    Sampled by inverting the exponential CDF, then mirroring ``t -> 1 - t`` with probability 1/2.
    """

    name = "u_shaped"

    def __init__(self, a: float = 4.0) -> None:
        if a <= 0:
            raise ValueError(f"u_shaped needs a > 0, got {a}")
        self.a = float(a)

    def config(self):
        return {"name": self.name, "a": self.a}

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        u = _uniform(n, generator, device, torch.float64)
        t = torch.log1p(u * math.expm1(self.a)) / self.a
        flip = _uniform(n, generator, device, torch.float64) < 0.5
        return torch.where(flip, 1 - t, t).to(dtype)

    def density(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        c = self.a / math.expm1(self.a)
        return 0.5 * c * (torch.exp(self.a * t) + torch.exp(self.a * (1 - t)))


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Time shift of SD3 (Esser et al. 2024, eq. 23) in our convention.

    In noise level ``sigma = 1 - t``: ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.
    ``shift > 1`` moves time towards the noise end (more steps/training at high noise).
    """
    sigma = 1 - t
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(resolution: Union[int, tuple], base_resolution: Union[int, tuple] = 256) -> float:
    """Resolution-dependent shift ``sqrt(m / n)`` (SD3): ``m`` pixels now, ``n`` at the base."""
    def npix(r):
        return r[0] * r[1] if isinstance(r, (tuple, list)) else r * r

    return math.sqrt(npix(resolution) / npix(base_resolution))


def mu_to_shift(mu: float) -> float:
    """FLUX-style ``mu``: ``shift = exp(mu)`` (``sigma' = e^mu / (e^mu + 1/sigma - 1)``)."""
    return math.exp(mu)


@TIME_DISTS.register("shifted")
class Shifted(TimeDistribution):
    """Any base distribution pushed through :func:`shift_time` (SD3's resolution shift)."""

    name = "shifted"

    def __init__(self, base: Union[str, Dict, TimeDistribution] = "uniform", shift: float = 3.0) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.base, self.shift = get_time_dist(base), float(shift)

    def config(self):
        return {"name": self.name, "base": self.base.config(), "shift": self.shift}

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        return shift_time(self.base.sample(n, generator, device, dtype), self.shift)

    def density(self, t):
        # inverse map: sigma = sigma' / (shift - (shift - 1) sigma'); d sigma / d sigma'
        t = torch.as_tensor(t, dtype=torch.float64)
        sp = 1 - t
        s = self.shift
        sigma = sp / (s - (s - 1) * sp)
        jac = s / (s - (s - 1) * sp) ** 2
        return self.base.density(1 - sigma) * jac


def get_time_dist(spec: Union[str, Dict, TimeDistribution] = "uniform", **kwargs) -> TimeDistribution:
    """Build from a name, a config dict or pass an object through."""
    return TIME_DISTS.build(spec, TimeDistribution, **kwargs)


def available() -> list:
    return TIME_DISTS.names()
