"""Honest error bars for a calibration: bootstrap intervals, a tail figure and a paired comparison.

A calibration's error on a batch of ``n`` noise samples is the endpoint RMSE
``r = sqrt(mean_i e_i)`` with ``e_i = mean_d (x_id - x_ref,id)^2`` the per-sample squared error.
The ``e_i`` are heavy-tailed (a few samples near the boundaries between modes, where
trajectories split, carry most of the error), so one number on a small batch can be far from
what the user will see. Three figures say how far:

* **prediction interval** of the RMSE that a *fresh* batch of the same size would give: with
  the bootstrap quantiles ``q_lo, q_hi`` of ``r*``, the difference of two independent batch
  estimates has twice the variance of one, so the interval is
  ``[r - sqrt(2) (r - q_lo), r + sqrt(2) (q_hi - r)]`` (clipped at 0). The bootstrap is
  *tail-augmented* (semi-parametric): the plain bootstrap of a mean is known to fail for
  infinite-variance data, and a batch that missed the rare large errors sees no tail at all
  (measured on a sharp mixture: a plain 95 % interval held a fresh batch's RMSE 29 times in 40,
  even a 99.9 % one 36 in 40). So the largest 10 % of the ``e_i`` (at least 10) are fitted with a
  Pareto tail above their threshold ``u`` (Hill's estimator of the index ``alpha``, kept >= 1.05 so
  the mean stays finite), every resampled value above ``u`` is redrawn from that tail, and the
  interval spans the plain and the tail-augmented bootstrap quantiles. On the
  same field this held the fresh RMSE 36 times in 40 at 95 % and 38 in 40 at 99 %, the level
  reported (wide at 256 samples on such a field, which is the truth; a self-sized calibration's
  thousands of samples narrow it). Its coverage is tested (``tests/optimize/test_errors.py``).
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
    level: float = 0.99

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


def _pareto_tail(e: Tensor, frac: float = 0.1) -> tuple:
    """Threshold ``u`` and Hill's tail index ``alpha`` of the largest ``frac`` of ``e`` (>= 10 values)."""
    s, _ = torch.sort(e)
    n = int(s.numel())
    k = min(n - 1, max(10, int(frac * n)))
    u = float(s[n - k - 1])
    if not u > 0:
        return u, math.inf
    alpha = k / float(torch.log(s[n - k:] / u).sum().clamp_min(1e-300))
    return u, max(alpha, 1.05)


def error_stats(e: Tensor, level: float = 0.99, seed: int = 0, n_boot: int = N_BOOT) -> ErrorStats:
    """:class:`ErrorStats` from per-sample squared errors ``e`` (:func:`per_sample_sq_error`), with the
    tail-augmented bootstrap of the module docstring."""
    e = e.double().reshape(-1)
    n = int(e.numel())
    if n == 0:
        raise ValueError("no samples to compute an error from")
    r = float(e.mean().sqrt())
    p99 = float(torch.quantile(e.sqrt(), 0.99)) if torch.isfinite(e).all() else math.inf
    if n < 20 or not math.isfinite(r):
        return ErrorStats(r, 0.0, math.inf, p99, n, level)
    g = torch.Generator().manual_seed(int(seed))
    b = e[torch.randint(0, n, (n_boot, n), generator=g)]
    a = (1.0 - level) / 2
    qs = torch.tensor([a, 1 - a], dtype=b.dtype)
    q_lo, q_hi = (float(v) for v in torch.quantile(b.mean(1).sqrt(), qs))  # the plain bootstrap
    u, alpha = _pareto_tail(e)
    if math.isfinite(alpha):  # and the tail-augmented one; the interval spans both
        redraw = u * torch.rand(b.shape, generator=g, dtype=b.dtype).pow(-1.0 / alpha)
        t_lo, t_hi = (float(v) for v in torch.quantile(torch.where(b > u, redraw, b).mean(1).sqrt(), qs))
        q_lo, q_hi = min(q_lo, t_lo), max(q_hi, t_hi)
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
