"""Honest error bars for a calibration: bootstrap intervals, a tail figure and a paired comparison.

A calibration's error on a batch of ``n`` noise samples is the endpoint RMSE
``r = sqrt(mean_i e_i)`` with ``e_i = mean_d (x_id - x_ref,id)^2`` the per-sample squared error.
The ``e_i`` are heavy-tailed (a few samples near the boundaries between modes, where
trajectories split, carry most of the error), so one number on a small batch can be far from
what the user will see. Three figures say how far:

* **prediction interval** of the RMSE that a *fresh* batch of the same size would give: with
  the bootstrap quantiles ``q_lo, q_hi`` of ``r*`` (``e`` resampled with replacement), the
  difference of two independent batch estimates has twice the variance of one, so the interval
  is ``[r - sqrt(2) (r - q_lo), r + sqrt(2) (q_hi - r)]`` (clipped at 0). Its coverage of a
  fresh batch's RMSE is tested (``tests/optimize/test_errors.py``).
* **tail**: the 99th percentile of the per-sample RMS error ``sqrt(e_i)``.
* **paired comparison** of two tables on the same samples (the held-out check): the bootstrap
  probability that table A's mean squared error is below table B's, resampling the *pairs*
  ``(e_A,i, e_B,i)``; the fallback keeps the fitted table only when that probability is high.

Written by hand: a percentile bootstrap over one vector is a few lines of torch, and scipy's
``bootstrap`` has no paired-probability form.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict

import torch
from torch import Tensor

__all__ = ["ErrorStats", "per_sample_sq_error", "error_stats", "prob_better"]

N_BOOT = 2000


def per_sample_sq_error(x: Tensor, ref: Tensor) -> Tensor:
    """``e_i = mean_d (x_id - ref_id)^2`` in float64, one value per sample (non-finite rows: inf)."""
    e = (x.double() - ref.double()).pow(2).reshape(x.shape[0], -1).mean(1)
    return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))


@dataclass(frozen=True)
class ErrorStats:
    """RMSE of a batch with its prediction interval (``lo``, ``hi``; ``level``) for a fresh batch of
    ``n`` samples, and the 99th percentile of the per-sample RMS error (``p99``)."""

    rmse: float
    lo: float
    hi: float
    p99: float
    n: int
    level: float = 0.95

    @property
    def rel_halfwidth(self) -> float:
        """Half the interval's width relative to the RMSE (how stable the estimate is)."""
        return (self.hi - self.lo) / (2 * self.rmse) if self.rmse > 0 else 0.0

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.rmse:.4g} [{self.lo:.4g}, {self.hi:.4g}] ({self.level:.0%} for a fresh batch of {self.n}), "
                f"p99 {self.p99:.4g}")


def _boot_index(n: int, seed: int, n_boot: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (n_boot, n), generator=g)


def error_stats(e: Tensor, level: float = 0.95, seed: int = 0, n_boot: int = N_BOOT) -> ErrorStats:
    """:class:`ErrorStats` from per-sample squared errors ``e`` (:func:`per_sample_sq_error`)."""
    e = e.double().reshape(-1)
    n = int(e.numel())
    if n == 0:
        raise ValueError("no samples to compute an error from")
    r = float(e.mean().sqrt())
    p99 = float(torch.quantile(e.sqrt(), 0.99)) if torch.isfinite(e).all() else math.inf
    if n == 1 or not math.isfinite(r):
        return ErrorStats(r, r if n > 1 else 0.0, math.inf, p99, n, level)
    rs = e[_boot_index(n, seed, n_boot)].mean(1).sqrt()
    a = (1.0 - level) / 2
    q_lo, q_hi = (float(v) for v in torch.quantile(rs, torch.tensor([a, 1 - a], dtype=rs.dtype)))
    k = math.sqrt(2.0)
    return ErrorStats(r, max(0.0, r - k * (r - q_lo)), r + k * (q_hi - r), p99, n, level)


def prob_better(e_a: Tensor, e_b: Tensor, seed: int = 0, n_boot: int = N_BOOT) -> float:
    """Bootstrap probability that ``mean(e_a) < mean(e_b)`` over the population the paired samples
    came from (resampling pairs). 1.0 / 0.0 when every resample agrees."""
    e_a, e_b = e_a.double().reshape(-1), e_b.double().reshape(-1)
    if e_a.shape != e_b.shape:
        raise ValueError(f"paired errors need the same samples, got {tuple(e_a.shape)} and {tuple(e_b.shape)}")
    if not torch.isfinite(e_a).all():
        return 0.0
    if not torch.isfinite(e_b).all():
        return 1.0
    idx = _boot_index(int(e_a.numel()), seed, n_boot)
    d = (e_a - e_b)[idx].mean(1)
    return float((d < 0).double().mean())
