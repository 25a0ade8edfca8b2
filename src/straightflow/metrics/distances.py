"""Distances between sample sets (W2, sliced W2, MMD) and the straightness of trajectories.

All of them compare float64 ``(N, D)`` sample sets (inputs are flattened, see
:mod:`.arrays`) and are deterministic given ``seed``:

- ``w2``: exact 2-Wasserstein distance, ``W2 = sqrt(min_P <P, C>)`` with
  ``C_ij = |x_i - y_j|^2`` and uniform marginals (POT network simplex);
- ``sliced_w2``: ``SW2 = ( E_theta W2^2(theta#x, theta#y) )^(1/2)`` over random directions;
- ``mmd``: unbiased squared MMD with a sum of RBF kernels
  ``k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))``;
- ``straightness``: ``S = ∫_0^1 E || (X_1 - X_0) - dX_t/dt ||^2 dt`` (Liu et al. 2022),
  discretised on a recorded trajectory.

A finite-sample distance is never zero even between two draws of one distribution: report
the data-vs-data floor beside it (:func:`straightflow.metrics.evaluate`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .arrays import ArrayLike, _check_pair, _to_numpy64


def _subsample(x: np.ndarray, max_n: Optional[int], seed: int) -> np.ndarray:
    """Deterministic subsample to at most ``max_n`` rows (sorted indices from a seeded RNG).

    Each set is subsampled with its own RNG seeded by ``seed``, so ``w2(x, x)`` picks the
    same rows on both sides and is exactly 0.
    """
    if max_n is None or x.shape[0] <= max_n:
        return x
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=max_n, replace=False))
    return x[idx]


# ----------------------------------------------------------------------------- OT metrics


def w2(x: ArrayLike, y: ArrayLike, max_n: Optional[int] = 2000, seed: int = 0) -> float:
    """Exact 2-Wasserstein distance between two empirical sets (uniform weights).

    Both sets are flattened to ``(N, D)`` and, if larger than ``max_n``, subsampled
    deterministically (seeded). The optimal plan is computed with POT's network-simplex
    solver ``ot.emd2`` on the squared Euclidean cost in float64 (computed from direct
    differences, so ``w2(x, x) == 0`` and ``w2(x, x + c) == |c|`` up to round-off); the result is
    ``sqrt(min_P <P, C>)``. Cost ``O(n^3)``-ish in time and ``O(n m)`` in memory: 2000 points
    take seconds. Raises ``RuntimeError`` if the solver does not reach the optimum.
    """
    import ot  # heavy (POT, scipy): imported on first use
    from scipy.spatial.distance import cdist

    xs = _subsample(_to_numpy64(x, "x"), max_n, seed)
    ys = _subsample(_to_numpy64(y, "y"), max_n, seed)
    _check_pair(xs, ys)
    n, m = xs.shape[0], ys.shape[0]
    # direct differences (not the |x|^2 + |y|^2 - 2xy expansion): identical points cost exactly 0
    cost = cdist(xs, ys, metric="sqeuclidean")
    a = np.full(n, 1.0 / n)
    b = np.full(m, 1.0 / m)
    val, log = ot.emd2(a, b, cost, numItermax=int(max(1_000_000, 100 * n * m)), log=True)
    if log.get("warning"):
        raise RuntimeError(f"w2: ot.emd2 did not reach the optimum: {log['warning']}")
    return float(math.sqrt(max(float(val), 0.0)))


def sliced_w2(x: ArrayLike, y: ArrayLike, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (POT ``ot.sliced_wasserstein_distance``, p=2, seeded).

    ``SW2 = ( E_theta W2^2(theta#x, theta#y) )^(1/2)`` estimated with ``n_projections``
    random directions on the unit sphere drawn from ``seed``.
    """
    import ot  # heavy (POT): imported on first use

    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    xs = _to_numpy64(x, "x")
    ys = _to_numpy64(y, "y")
    _check_pair(xs, ys)
    val = ot.sliced_wasserstein_distance(xs, ys, n_projections=n_projections, p=2, seed=seed)
    return float(val)


def _median_distance(x: Tensor, y: Tensor, max_points: int = 1000) -> float:
    """Median pairwise Euclidean distance of the pooled set (first ``max_points`` rows of each)."""
    z = torch.cat([x[:max_points], y[:max_points]])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
    med = float(d[iu[0], iu[1]].median()) if z.shape[0] > 1 else 0.0
    return med if med > 0 else 1.0


def _kernel_sum(a: Tensor, b: Tensor, gammas: Tensor, chunk: int = 1024) -> float:
    """``sum_{i,j} sum_k exp(-gamma_k |a_i - b_j|^2)``, computed in row blocks."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, a.shape[0], chunk):
        d2 = torch.cdist(a[i : i + chunk], b).pow_(2)
        total += torch.exp(-d2.unsqueeze(-1) * gammas).sum()
    return float(total)


def mmd(x: ArrayLike, y: ArrayLike, bandwidths: Optional[Sequence[float]] = None) -> float:
    """Squared maximum mean discrepancy, unbiased estimator, with a sum of RBF kernels.

    ``k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))`` over the bandwidths ``s``. Default
    bandwidths: the median heuristic ``s0`` = median pairwise Euclidean distance of the pooled
    samples (first 1000 of each set), times ``[0.25, 0.5, 1, 2, 4]``. Unbiased estimator::

        MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)

    It can be slightly negative when the two distributions are equal. Needs >= 2 samples per
    set; memory is bounded by computing the kernel in row blocks.
    """
    xs = torch.from_numpy(_to_numpy64(x, "x"))
    ys = torch.from_numpy(_to_numpy64(y, "y"))
    _check_pair(xs.numpy(), ys.numpy())
    n, m = xs.shape[0], ys.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples per set, got {n} and {m}")
    if bandwidths is None:
        s0 = _median_distance(xs, ys)
        bws = [s0 * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    else:
        bws = [float(s) for s in bandwidths]
        if not bws or any(not (s > 0) for s in bws):
            raise ValueError(f"bandwidths must be positive numbers, got {list(bandwidths)}")
    gammas = torch.tensor([1.0 / (2.0 * s * s) for s in bws], dtype=torch.float64)
    k = len(bws)  # k(a, a) = number of kernels
    kxx = (_kernel_sum(xs, xs, gammas) - n * k) / (n * (n - 1))
    kyy = (_kernel_sum(ys, ys, gammas) - m * k) / (m * (m - 1))
    kxy = _kernel_sum(xs, ys, gammas) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


# ----------------------------------------------------------------------------- straightness


def straightness(trajectory: ArrayLike, times: ArrayLike) -> float:
    """Straightness of sampled trajectories (Liu et al. 2022, "Flow Straight and Fast").

    The paper defines ``S = ∫_0^1 E || (X_1 - X_0) - dX_t/dt ||^2 dt``; it is zero iff every
    trajectory is a straight line travelled at constant speed. Discretised on a trajectory
    ``x`` of shape ``(T+1, B, ...)`` recorded at ``times`` ``t_0 < ... < t_T`` (or decreasing)::

        S = sum_i |dt_i| * mean_b || vbar_b - (x_{i+1,b} - x_{i,b}) / dt_i ||^2,
        dt_i = t_{i+1} - t_i,     vbar = (x_T - x_0) / (t_T - t_0),

    with the squared norm summed over the data dimensions and averaged over the batch. For
    ``times`` spanning ``[0, 1]`` (the convention) ``vbar = x_T - x_0`` and this is exactly the
    paper's integral with the velocity replaced by the finite difference on each step.
    """
    x = torch.as_tensor(trajectory).detach().to("cpu", torch.float64)
    t = torch.as_tensor(times).detach().to("cpu", torch.float64).reshape(-1)
    if x.ndim < 2:
        raise ValueError(f"trajectory must be (T+1, B, ...), got shape {tuple(x.shape)}")
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"times has {t.shape[0]} entries but the trajectory has {x.shape[0]} states")
    if x.shape[0] < 2:
        raise ValueError("trajectory needs at least 2 states")
    dt = t[1:] - t[:-1]
    if not (torch.all(dt > 0) or torch.all(dt < 0)):
        raise ValueError("times must be strictly monotone")
    x = x.reshape(x.shape[0], x.shape[1], -1)
    vbar = (x[-1] - x[0]) / (t[-1] - t[0])  # (B, D)
    steps = (x[1:] - x[:-1]) / dt[:, None, None]  # (T, B, D)
    dev = (vbar.unsqueeze(0) - steps).pow(2).sum(-1).mean(-1)  # (T,)
    return float((dt.abs() * dev).sum())
