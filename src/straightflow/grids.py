"""Sampling time grids: ``steps + 1`` increasing times from ``t0`` (noise) to ``t1`` (data).

Grids are float64 tensors. :func:`validate_grid` is the single place that checks a grid
(1-D, finite, inside [0, 1], strictly monotone); every solver calls it before any work.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .paths import AffinePath, get_path
from .registry import Registry
from .time import resolution_shift, shift_time

GRIDS: Registry = Registry("grid")

GridLike = Union[str, Tensor, Sequence[float]]


class GridError(ValueError):
    """A time grid is malformed (not 1-D, not finite, outside [0, 1], or not monotone)."""


def validate_grid(grid: Union[Tensor, Sequence[float]], direction: int = 0) -> Tensor:
    """Return ``grid`` as float64 after checking it; ``direction`` +1 increasing, -1 decreasing, 0 either."""
    g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if g.ndim != 1 or g.numel() < 2:
        raise GridError(f"a time grid must be 1-D with at least 2 times, got shape {tuple(g.shape)}")
    if not torch.isfinite(g).all():
        raise GridError(f"time grid has non-finite values: {g.tolist()}")
    if g.min() < -1e-12 or g.max() > 1 + 1e-12:
        raise GridError(f"time grid must lie in [0, 1], got range [{g.min().item():.4g}, {g.max().item():.4g}]")
    d = g[1:] - g[:-1]
    inc, dec = bool((d > 0).all()), bool((d < 0).all())
    if not (inc or dec):
        bad = int(torch.nonzero((d <= 0) if d[0] > 0 else (d >= 0))[0])
        raise GridError(
            f"time grid must be strictly monotone; it breaks at index {bad}: "
            f"{g[bad].item():.6g} -> {g[bad + 1].item():.6g}"
        )
    if direction > 0 and not inc:
        raise GridError("time grid must be increasing here (sampling runs from noise t=0 to data t=1)")
    if direction < 0 and not dec:
        raise GridError("time grid must be decreasing here (inversion runs from data t=1 to noise t=0)")
    return g.clamp(0.0, 1.0)


MAX_STEPS = 1_000_000  # finer grids step below float32's time resolution near t = 1 (about 6e-8)


def _check_steps(steps: int) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be <= {MAX_STEPS:,} (got {steps:,}): a finer grid steps below float32's "
                         "time resolution, so its times would not even be distinct; a few hundred steps already "
                         "reach the solvers' accuracy limit")
    return steps


@GRIDS.register("uniform", aliases=("linear",))
def uniform_grid(steps: int, t0: float = 0.0, t1: float = 1.0, **_) -> Tensor:
    """``t_i = t0 + (t1 - t0) i / steps``."""
    return torch.linspace(t0, t1, _check_steps(steps) + 1, dtype=torch.float64)


@GRIDS.register("shifted", aliases=("shift", "sd3"))
def shifted_grid(
    steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    shift: Optional[float] = None,
    mu: Optional[float] = None,
    resolution: Optional[int] = None,
    base_resolution: int = 256,
    **_,
) -> Tensor:
    """Uniform grid pushed through the SD3 shift ``sigma' = s sigma / (1 + (s - 1) sigma)``.

    Give ``shift`` directly, or FLUX's ``mu`` (``shift = e^mu``), or a ``resolution`` (``shift =
    sqrt(pixels / base pixels)``). Default shift 3.0 (SD3's choice at 1024 px).
    """
    given = [v is not None for v in (shift, mu, resolution)]
    if sum(given) > 1:
        raise ValueError("give at most one of shift, mu, resolution")
    if mu is not None:
        shift = math.exp(mu)
    elif resolution is not None:
        shift = resolution_shift(resolution, base_resolution)
    elif shift is None:
        shift = 3.0
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift_time(uniform_grid(steps, t0, t1), shift)


@GRIDS.register("logsnr", aliases=("log_snr", "logsnr_uniform"))
def logsnr_grid(
    steps: int, t0: float = 0.0, t1: float = 1.0, path: Union[str, AffinePath] = "linear",
    t_min: float = 1e-3, **_
) -> Tensor:
    """Uniform in ``lambda = log(alpha^2 / sigma^2)`` (DPM-Solver's choice).

    ``lambda`` is infinite at t = 0 and t = 1 on most paths, so the spacing runs between
    ``lambda(max(t0, t_min))`` and ``lambda(min(t1, 1 - t_min))``; an endpoint outside that range
    (t0 < t_min or t1 > 1 - t_min) is added as one extra step.
    """
    p = get_path(path)
    _check_steps(steps)
    a, b = max(t0, t_min), min(t1, 1 - t_min)
    head, tail = ([t0] if t0 < a else []), ([t1] if t1 > b else [])
    n_inner = steps + 1 - len(head) - len(tail)
    if n_inner < 2:
        return torch.tensor([t0, t1], dtype=torch.float64) if steps == 1 else uniform_grid(steps, t0, t1)
    lam = torch.linspace(float(p.log_snr(torch.tensor(a))), float(p.log_snr(torch.tensor(b))), n_inner, dtype=torch.float64)
    inner = p.t_from_log_snr(lam)
    inner[0], inner[-1] = a, b
    return torch.cat([torch.tensor(head, dtype=torch.float64), inner, torch.tensor(tail, dtype=torch.float64)])


@GRIDS.register("karras", aliases=("edm",))
def karras_grid(
    steps: int, t0: float = 0.0, t1: float = 1.0, rho: float = 7.0, s_min: float = 2e-3, s_max: float = 80.0, **_
) -> Tensor:
    """Karras et al. (2022) spacing on ``s = (1 - t) / t`` (EDM's sigma for the linear path):
    ``s_i = (s_max^{1/rho} + i/(n-1) (s_min^{1/rho} - s_max^{1/rho}))^rho``, ``t = 1 / (1 + s)``,
    with ``t0`` and ``t1`` appended at the ends.
    """
    _check_steps(steps)
    if steps == 1:
        return torch.tensor([t0, t1], dtype=torch.float64)
    i = torch.linspace(0, 1, steps - 1, dtype=torch.float64)
    s = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    inner = (1 / (1 + s)).clamp(t0, t1)
    return torch.cat([torch.tensor([t0], dtype=torch.float64), inner, torch.tensor([t1], dtype=torch.float64)])


def make_grid(grid: GridLike = "uniform", steps: Optional[int] = None, t0: float = 0.0, t1: float = 1.0, **kwargs) -> Tensor:
    """A validated increasing grid from a name (needs ``steps``) or an explicit sequence of times."""
    if isinstance(grid, str):
        if steps is None:
            raise ValueError(f"grid {grid!r} needs steps")
        g = GRIDS.get(grid)(steps, t0=t0, t1=t1, **kwargs)
    elif callable(grid):
        g = grid(steps, t0=t0, t1=t1, **kwargs)
    else:
        g = torch.as_tensor(grid, dtype=torch.float64)
        if steps is not None and g.numel() != steps + 1:
            raise GridError(f"custom grid has {g.numel()} times, which is not steps + 1 = {steps + 1}")
    return validate_grid(g)


def available() -> list:
    return GRIDS.names()
