"""Affine probability paths and the conversions between parameterisations.

An affine path is ``x_t = alpha(t) * x1 + sigma(t) * x0`` with ``t = 0`` the source (noise)
``x0 ~ N(0, I)`` and ``t = 1`` the data ``x1``. Its conditional velocity is
``u_t = alpha'(t) * x1 + sigma'(t) * x0``. Given ``x_t`` and any one of the four predictions
(velocity ``v``, data ``x1_hat``, noise ``x0_hat``, score ``s``) the other three follow from the
2x2 linear system ``[x; v] = [[alpha, sigma], [alpha', sigma']] [x1; x0]`` and, for the Gaussian
source, ``s = -x0_hat / sigma`` (Tweedie). Everything here is exact algebra; it is tested by
round trips on every path.

Path-to-path conversion (Stochastic Interpolants, Albergo et al. 2023; Kim et al. 2025,
"Inference-Time Scaling for Flow Models"): two affine paths with the same source and data have
the same marginals up to a time change and a scale. If ``snr_A(tau) = snr_B(t)`` then
``x^B_t = c * x^A_tau`` with ``c = sigma_B(t) / sigma_A(tau)``, so a velocity trained on A gives
the posterior means ``x1_hat, x0_hat`` at ``(x / c, tau)``, and B's velocity is
``alpha_B'(t) x1_hat + sigma_B'(t) x0_hat``. No retraining.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

from .registry import Registry

PATHS: Registry = Registry("path")

PREDICTIONS = ("velocity", "x1", "x0", "score")

# Divisions by alpha (at t = 0) or sigma (at t = 1) are guarded with this floor, at the ends only.
_EPS = 1e-12


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (B,) or scalar time tensor so it broadcasts against ``x`` of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def _safe(d: Tensor, t: Tensor) -> Tensor:
    """A denominator ``d`` at time ``t`` with the ends guarded (avoids 0/0 where alpha or sigma vanish).

    The floor ``|d| >= eps`` (sign kept) applies only at the ends of the interval (``t <= 0`` or
    ``t >= 1``, where e.g. ``cos(pi / 2) = 6e-17`` stands for 0) and to exact zeros (underflow).
    Inside (0, 1) a small denominator is the true value: ``alpha = t^3 = 1e-15`` at ``t = 1e-5``
    on the polynomial path must divide as is (a floor there was off by a factor 1000).
    """
    t = torch.as_tensor(t, dtype=d.dtype, device=d.device)
    tiny = (d == 0) | (((t <= 0) | (t >= 1)) & (d.abs() < _EPS))
    return torch.where(tiny, torch.full_like(d, _EPS) * torch.where(d < 0, -1.0, 1.0), d)


class AffinePath(ABC):
    """Base class: subclasses give ``alpha, sigma`` and their time derivatives."""

    name: str = "affine"

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor: ...

    # ------------------------------------------------------------------ serialisation
    def config(self) -> Dict:
        """JSON-able description that :func:`get_path` rebuilds."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ interpolation
    def coefficients(self, t: Tensor, x: Tensor):
        """``alpha, sigma, alpha', sigma'`` at ``t``, broadcast against ``x``."""
        tt = _bcast(t, x)
        return self.alpha(tt), self.sigma(tt), self.d_alpha(tt), self.d_sigma(tt)

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor):
        """Return ``(x_t, u_t)``: ``x_t = alpha x1 + sigma x0`` and ``u_t = alpha' x1 + sigma' x0``."""
        a, s, da, ds = self.coefficients(t, x1)
        return a * x1 + s * x0, da * x1 + ds * x0

    # ------------------------------------------------------------------ SNR
    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``, increasing in t (-inf at pure noise)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr` (bisection in float64; subclasses give closed forms)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            below = self.log_snr(mid) < lam
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    # ------------------------------------------------------------------ conversions
    def velocity_to_x1(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``x1_hat = (sigma' x - sigma v) / (alpha sigma' - sigma alpha')``."""
        a, s, da, ds = self.coefficients(t, x)
        return (ds * x - s * v) / _safe(a * ds - s * da, _bcast(t, x))

    def velocity_to_x0(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``x0_hat = (alpha v - alpha' x) / (alpha sigma' - sigma alpha')``."""
        a, s, da, ds = self.coefficients(t, x)
        return (a * v - da * x) / _safe(a * ds - s * da, _bcast(t, x))

    def x1_to_x0(self, x1: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``x0_hat = (x - alpha x1_hat) / sigma``."""
        a, s, _, _ = self.coefficients(t, x)
        return (x - a * x1) / _safe(s, _bcast(t, x))

    def x0_to_x1(self, x0: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``x1_hat = (x - sigma x0_hat) / alpha``."""
        a, s, _, _ = self.coefficients(t, x)
        return (x - s * x0) / _safe(a, _bcast(t, x))

    def x1_to_velocity(self, x1: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``v = alpha' x1_hat + sigma' (x - alpha x1_hat) / sigma``."""
        _, _, da, ds = self.coefficients(t, x)
        return da * x1 + ds * self.x1_to_x0(x1, x, t)

    def x0_to_velocity(self, x0: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``v = alpha' (x - sigma x0_hat) / alpha + sigma' x0_hat``."""
        _, _, da, ds = self.coefficients(t, x)
        return da * self.x0_to_x1(x0, x, t) + ds * x0

    def velocity_to_score(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Score of the marginal for a N(0, I) source: ``s = -x0_hat / sigma``."""
        _, s, _, _ = self.coefficients(t, x)
        return -self.velocity_to_x0(v, x, t) / _safe(s, _bcast(t, x))

    def score_to_velocity(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``x0_hat = -sigma s``, then :meth:`x0_to_velocity`."""
        _, s, _, _ = self.coefficients(t, x)
        return self.x0_to_velocity(-s * score, x, t)

    def convert(self, pred: Tensor, x: Tensor, t: Tensor, src: str, dst: str) -> Tensor:
        """Convert a prediction between ``velocity``, ``x1``, ``x0`` and ``score``."""
        for p in (src, dst):
            if p not in PREDICTIONS:
                raise ValueError(f"unknown prediction {p!r}; valid: {', '.join(PREDICTIONS)}")
        if src == dst:
            return pred
        if src == "velocity":
            v = pred
        elif src == "x1":
            v = self.x1_to_velocity(pred, x, t)
        elif src == "x0":
            v = self.x0_to_velocity(pred, x, t)
        else:
            v = self.score_to_velocity(pred, x, t)
        if dst == "velocity":
            return v
        if dst == "x1":
            return self.velocity_to_x1(v, x, t)
        if dst == "x0":
            return self.velocity_to_x0(v, x, t)
        return self.velocity_to_score(v, x, t)


@PATHS.register("linear", aliases=("rectified", "rf", "ot", "cond_ot"))
class LinearPath(AffinePath):
    """Rectified flow: ``alpha = t, sigma = 1 - t`` (Liu et al. 2022, "Flow Straight and Fast")."""

    name = "linear"

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return -torch.ones_like(t)

    def interpolate(self, x0, x1, t):
        # fast path for the hot loop of training: x_t = x0 + t (x1 - x0), u_t = x1 - x0
        u = x1 - x0
        return torch.addcmul(x0, _bcast(t, x1), u), u

    def t_from_log_snr(self, lam):
        # t / (1 - t) = exp(lam / 2)
        return torch.sigmoid(torch.as_tensor(lam, dtype=torch.float64) / 2)


@PATHS.register("cosine", aliases=("trig", "trigonometric"))
class CosinePath(AffinePath):
    """Trigonometric path: ``alpha = sin(pi t / 2), sigma = cos(pi t / 2)`` (variance preserving)."""

    name = "cosine"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def t_from_log_snr(self, lam):
        # tan(pi t / 2) = exp(lam / 2)
        return (2 / math.pi) * torch.atan(torch.exp(torch.as_tensor(lam, dtype=torch.float64) / 2))


@PATHS.register("vp", aliases=("ddpm", "variance_preserving"))
class VPPath(AffinePath):
    """Variance-preserving path of DDPM/score SDEs with a linear beta schedule.

    With diffusion time ``s = 1 - t``: ``alpha = exp(-(s^2 (b1 - b0) / 4 + s b0 / 2))``,
    ``sigma = sqrt(1 - alpha^2)``; ``b0 = 0.1``, ``b1 = 20`` (Song et al. 2021). Note that
    ``alpha(0) = exp(-5.025) ~ 6.6e-3``, not exactly 0, as in the original VP process.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VP path needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}

    def _log_alpha(self, t):
        s = 1 - t
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def d_alpha(self, t):
        s = 1 - t
        # d/dt log alpha = (s (b1 - b0) / 2 + b0 / 2)
        return self.alpha(t) * (0.5 * s * (self.beta_max - self.beta_min) + 0.5 * self.beta_min)

    def d_sigma(self, t):
        a = self.alpha(t)
        return -a * self.d_alpha(t) / torch.clamp(self.sigma(t), min=_EPS)

    def t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(lam)  =>  log alpha = 0.5 log sigmoid(lam) = -(s^2 d / 4 + s b0 / 2)
        lam = torch.as_tensor(lam, dtype=torch.float64)
        la = 0.5 * torch.nn.functional.logsigmoid(lam)
        d, b0 = self.beta_max - self.beta_min, self.beta_min
        # d/4 s^2 + b0/2 s + la = 0, positive root
        s = (-b0 / 2 + torch.sqrt(b0**2 / 4 - d * la)) / (d / 2)
        return 1 - s


@PATHS.register("polynomial", aliases=("poly",))
class PolynomialPath(AffinePath):
    """``alpha = t^n, sigma = 1 - t^n`` (polynomial convex schedule of Lipman et al.'s library)."""

    name = "polynomial"

    def __init__(self, n: float = 2.0) -> None:
        if n <= 0:
            raise ValueError(f"polynomial path needs n > 0, got {n}")
        self.n = float(n)

    def config(self):
        return {"name": self.name, "n": self.n}

    def alpha(self, t):
        return t**self.n

    def sigma(self, t):
        return 1 - t**self.n

    def d_alpha(self, t):
        return self.n * t ** (self.n - 1)

    def d_sigma(self, t):
        return -self.n * t ** (self.n - 1)


class CustomPath(AffinePath):
    """A path from user functions ``alpha(t)``, ``sigma(t)``; derivatives by autograd if omitted.

    Requirements: alpha increasing, sigma decreasing, ``alpha(1) = 1``, ``sigma(1) = 0`` (checked
    loosely at construction), so the log-SNR is increasing and the conversions are defined.
    """

    name = "custom"

    def __init__(
        self,
        alpha: Callable[[Tensor], Tensor],
        sigma: Callable[[Tensor], Tensor],
        d_alpha: Optional[Callable[[Tensor], Tensor]] = None,
        d_sigma: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        self._a, self._s, self._da, self._ds = alpha, sigma, d_alpha, d_sigma
        tt = torch.linspace(0, 1, 65, dtype=torch.float64)
        a, s = alpha(tt), sigma(tt)
        if not (torch.all(a[1:] >= a[:-1] - 1e-9) and torch.all(s[1:] <= s[:-1] + 1e-9)):
            raise ValueError("custom path needs alpha non-decreasing and sigma non-increasing on [0, 1]")
        if abs(float(a[-1]) - 1) > 1e-6 or abs(float(s[-1])) > 1e-6:
            raise ValueError("custom path needs alpha(1) = 1 and sigma(1) = 0 (t = 1 is the data)")

    def config(self):
        # Functions are not serialisable; a run trained on a custom path stores this marker and
        # the user passes the same path object again when loading.
        return {"name": "custom"}

    @staticmethod
    def _grad(f, t):
        with torch.inference_mode(False), torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(tt).sum(), tt)
        return g

    def alpha(self, t):
        return self._a(t)

    def sigma(self, t):
        return self._s(t)

    def d_alpha(self, t):
        return self._da(t) if self._da is not None else self._grad(self._a, t)

    def d_sigma(self, t):
        return self._ds(t) if self._ds is not None else self._grad(self._s, t)


PathSpec = Union[str, AffinePath, Dict]  # a probability path: a name, a config dict or an AffinePath
PathLike = PathSpec  # deprecated alias (PathLike reads as a file path); use PathSpec


def get_path(path: PathSpec = "linear", **kwargs) -> AffinePath:
    """Build a path from a name, a config dict (``{"name": ..., **params}``) or pass one through."""
    if isinstance(path, dict) and path.get("name") == "custom":
        raise ValueError("a custom path cannot be rebuilt from its config; pass the CustomPath object")
    return PATHS.build(path, AffinePath, **kwargs)


def available() -> list:
    """Names a user can pass as ``path=``."""
    return PATHS.names()


class PathConvertedVelocity:
    """Velocity of path ``dst`` computed from a model trained on path ``src`` (no retraining).

    ``v_dst(x, t) = alpha_dst'(t) x1_hat + sigma_dst'(t) x0_hat`` where ``x1_hat, x0_hat`` are
    ``src``'s posterior means at ``(x / c, tau)``, ``snr_src(tau) = snr_dst(t)`` and
    ``c = sigma_dst(t) / sigma_src(tau)``.
    """

    def __init__(self, model: Callable, src: PathSpec, dst: PathSpec) -> None:
        self.model, self.src, self.dst = model, get_path(src), get_path(dst)

    def map_time(self, t: Tensor):
        """Return ``(tau, c)`` for ``dst`` times ``t``: matched SNR and the scale between states."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        tau = self.src.t_from_log_snr(self.dst.log_snr(t64)).clamp(0, 1)
        c = self.dst.sigma(t64) / self.src.sigma(tau).clamp_min(_EPS)
        # At t = 1 both sigmas vanish; the ratio of alphas is the limit.
        c_end = self.dst.alpha(t64) / self.src.alpha(tau).clamp_min(_EPS)
        c = torch.where(self.dst.sigma(t64) < 1e-9, c_end, c)
        return tau, c

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        tau, c = self.map_time(t)
        tau_x = tau.to(device=x.device, dtype=x.dtype)
        cb = _bcast(c.to(device=x.device, dtype=x.dtype), x)
        xs = x / cb
        v_src = self.model(xs, tau_x, **cond)
        x1 = self.src.velocity_to_x1(v_src, xs, tau_x)
        x0 = self.src.velocity_to_x0(v_src, xs, tau_x)
        _, _, da, ds = self.dst.coefficients(t, x)
        return da * x1 + ds * x0


def convert_velocity(model: Callable, src: PathSpec, dst: PathSpec) -> PathConvertedVelocity:
    """Wrap a velocity model trained on path ``src`` as a velocity for path ``dst``."""
    return PathConvertedVelocity(model, src, dst)
