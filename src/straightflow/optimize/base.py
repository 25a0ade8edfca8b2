"""Shared pieces of the schedule optimisers: calibration noise, RMSE, solver checks, stacked rows.

- ``_noise``: a calibration batch from a tensor, or from a shape ``(batch, *sample_shape)``
  drawn from ``N(0, I)`` with a seeded generator;
- ``_rmse``: ``sqrt(mean((a - b)^2))`` over all elements, in float64;
- ``_check_deterministic``: schedules and BOSS need deterministic solvers;
- ``_repeat_cond``: conditioning for one solver step run on many (pair, sample) rows stacked
  along the batch, each row with its own time (``CountedVelocity`` takes per-row times and
  counts the calls).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..paths import PathLike as PathSpec
from ..paths import get_path
from ..solvers import get_solver

NoiseLike = Union[Tensor, Sequence[int]]


# ====================================================================== helpers
def _noise(noise_or_shape: NoiseLike, seed: int) -> Tensor:
    if torch.is_tensor(noise_or_shape):
        if not noise_or_shape.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise_or_shape.dtype}")
        return noise_or_shape
    shape = tuple(int(s) for s in noise_or_shape)
    if len(shape) < 2:
        raise ValueError(f"noise shape must be (batch, *sample_shape), got {shape}")
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def _rmse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _solver_options(spec, path: PathSpec) -> Dict[str, Any]:
    return {"path": get_path(path)} if spec.needs_path else {}


def _check_deterministic(name: str):
    spec = get_solver(name)
    if spec.stochastic:
        raise ValueError(f"solver {spec.name!r} is stochastic; schedules and BOSS need deterministic solvers")
    return spec


def _repeat_cond(cond: Optional[Mapping[str, Any]], batch: int, reps: int) -> Dict[str, Any]:
    """Tile batch-shaped conditioning tensors ``reps`` times along the batch dimension."""
    out = {}
    for k, v in (cond or {}).items():
        if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == batch:
            out[k] = v.repeat(reps, *([1] * (v.ndim - 1)))
        else:
            out[k] = v
    return out


