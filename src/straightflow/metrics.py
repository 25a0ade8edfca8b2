"""Metrics: W2, sliced W2, MMD, straightness, PSNR/SSIM and a classifier Fréchet distance.

Distribution metrics (``w2``, ``sliced_w2``, ``mmd``, ``fd``) compare two sets of samples;
every report should print the *data-vs-data floor* beside the figure (:func:`evaluate`,
:class:`MetricReport`), because a finite-sample metric is never zero even between two draws
of the same distribution.

Conventions: images are float32 ``(N, C, H, W)`` in ``[-1, 1]``; vectors ``(N, D)``. Every
distribution metric flattens its inputs to ``(N, D)``. All randomness is seeded.

Classifier Fréchet distance. Inception-FID does not apply to 8x8 digits and its weights
cannot be downloaded here, so the project trains its own small CNN (:class:`DigitClassifier`)
with the recipe in :func:`train_classifier` and measures the Fréchet distance between
Gaussians fitted to its penultimate-layer features. Weights are cached at
``$STRAIGHTFLOW_CACHE/classifiers/<name>-<RECIPE_VERSION>.safetensors`` (default cache
``~/.cache/straightflow``), with a JSON beside them holding the held-out accuracy; they are
trained on first use (a few seconds on 2 CPU cores) and loaded afterwards.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import io
from .registry import Registry

ArrayLike = Union[Tensor, np.ndarray]

__all__ = [
    "w2",
    "sliced_w2",
    "mmd",
    "straightness",
    "psnr",
    "ssim",
    "frechet_distance",
    "classifier_fd",
    "DigitClassifier",
    "train_classifier",
    "feature_extractor",
    "load_digits_images",
    "classifier_features",
    "classifier_cache_path",
    "MetricSpec",
    "MetricReport",
    "evaluate",
    "available",
    "METRICS",
    "RECIPE_VERSION",
]


# ----------------------------------------------------------------------------- helpers


def _to_numpy64(x: ArrayLike, what: str = "x") -> np.ndarray:
    """Any tensor/array -> float64 numpy array of shape (N, D) (flattened), NaN-checked."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError(f"{what}: expected a set of samples (N, ...), got a scalar")
    if x.ndim == 1:
        x = x[:, None]  # N scalars
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] == 0:
        raise ValueError(f"{what}: empty sample set")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: contains NaN or inf")
    return x


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"sample sets have different dimensions after flattening: {x.shape[1]} vs {y.shape[1]}"
        )


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
    import ot
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
    import ot

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


# ----------------------------------------------------------------------------- image metrics


def _images(x: ArrayLike, what: str) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    return x


def psnr(x: ArrayLike, y: ArrayLike, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)`` per image, averaged.

    The MSE is taken over each image's (C, H, W); the per-image PSNRs are then averaged over
    the batch. An image identical to its reference has ``MSE = 0`` and PSNR ``+inf``, so the
    mean is ``float('inf')`` as soon as one pair is identical.
    """
    a, b = _images(x, "x"), _images(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(1)
    vals = 10.0 * torch.log10(data_range**2 / mse)  # mse = 0 -> inf
    return float(vals.mean())


def _gaussian_window(size: int, sigma: float) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float = 2.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged.

    Local means, variances and covariance are Gaussian-weighted (window ``11``, sigma
    ``1.5``) over the valid region (no padding), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with
    ``L = data_range``; the SSIM map is averaged over positions and channels for each image
    and then over the batch. For images smaller than the window (e.g. 8x8 digits) the window
    shrinks to ``min(window, H, W)``, made odd (8x8 -> 7x7), sigma unchanged. Computed in
    float64 with ``conv2d`` per channel (grouped convolution).
    """
    a, b = _images(x, "x"), _images(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    _, c, h, w = a.shape
    size = min(window, h, w)
    if size % 2 == 0:
        size -= 1
    if size < 1:
        raise ValueError(f"images too small for SSIM: {h}x{w}")
    g = _gaussian_window(size, sigma).expand(c, 1, size, size).contiguous()

    def filt(z: Tensor) -> Tensor:
        return F.conv2d(z, g, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(smap.flatten(1).mean(1).mean())


# ----------------------------------------------------------------------------- Fréchet distance


def frechet_distance(feat_a: ArrayLike, feat_b: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (float64).

    ``FD = |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` with sample means and
    (unbiased) covariances; the matrix square root is ``scipy.linalg.sqrtm``. If it is not
    finite (singular product), ``eps * I`` is added to both covariances. Tiny imaginary parts
    from round-off are dropped; a large one raises ``ValueError``.
    """
    from scipy import linalg

    a = _to_numpy64(feat_a, "feat_a")
    b = _to_numpy64(feat_b, "feat_b")
    _check_pair(a, b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set, got {a.shape[0]}, {b.shape[0]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = np.atleast_2d(np.cov(a, rowvar=False))
    cb = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # singular products (dead ReLU features) are routine
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(ca @ cb)
        if not np.all(np.isfinite(covmean)):
            off = np.eye(ca.shape[0]) * eps
            covmean = linalg.sqrtm((ca + off) @ (cb + off))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(ca) + np.trace(cb) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


# ----------------------------------------------------------------------------- classifier

RECIPE_VERSION = "v1"
"""Bump when the architecture or the training recipe changes: the cache file name carries it."""

# The training recipes, by extractor name. ``image_size``: training resolution; ``shift``:
# max random translation in pixels (at that resolution); ``zoom``: range of random scale.
_RECIPES: Dict[str, Dict[str, Any]] = {
    "digits": dict(image_size=8, steps=600, batch_size=64, lr=3e-3, weight_decay=1e-4,
                   shift=1.0, zoom=(1.0, 1.0)),
    "mnist": dict(image_size=28, steps=800, batch_size=64, lr=3e-3, weight_decay=1e-4,
                  shift=3.0, zoom=(0.7, 1.05)),
    "custom": dict(image_size=None, steps=600, batch_size=64, lr=3e-3, weight_decay=1e-4,
                   shift=1.0, zoom=(1.0, 1.0)),
}


class DigitClassifier(nn.Module):
    """Small CNN for 1-channel images in ``[-1, 1]`` of any size >= 8.

    ``conv3x3(1->32)`` at the input resolution, adaptive average pooling to 8x8,
    ``conv3x3(32->32)``, average pooling to 4x4, ``conv3x3(32->64)``, flatten (1024),
    ``linear(1024->128)`` = the features, ``linear(128->n_classes)`` = the logits. All
    activations are ReLU. 8x8 digits and 28x28 MNIST go through the same network.
    """

    feature_dim = 128

    def __init__(self, n_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, n_classes)

    def features(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < 8:
            raise ValueError(
                f"DigitClassifier expects (N, {self.in_channels}, H, W) images with H, W >= 8, "
                f"got shape {tuple(x.shape)}"
            )
        h = F.relu(self.conv1(x))
        h = F.adaptive_avg_pool2d(h, 8)
        h = F.relu(self.conv2(h))
        h = F.avg_pool2d(h, 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_digits_images(size: int = 8) -> Tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as float32 ``(1797, 1, size, size)`` in ``[-1, 1]``.

    ``size != 8`` upsamples with bilinear interpolation. Returns ``(images, labels)``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(-1, 1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def _augment(x: Tensor, gen: torch.Generator, shift: float, zoom: Tuple[float, float]) -> Tensor:
    """Random translation (uniform in ±shift pixels) and zoom, background -1 outside."""
    n, _, h, w = x.shape
    z = torch.empty(n).uniform_(zoom[0], zoom[1], generator=gen)
    sx = torch.empty(n).uniform_(-shift, shift, generator=gen)
    sy = torch.empty(n).uniform_(-shift, shift, generator=gen)
    if shift >= 1 and zoom == (1.0, 1.0):
        sx, sy = sx.round(), sy.round()  # whole-pixel shifts stay exact (no blur)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / z
    theta[:, 1, 1] = 1.0 / z
    theta[:, 0, 2] = -2.0 * sx / w  # normalised coordinates, align_corners=False
    theta[:, 1, 2] = -2.0 * sy / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample (x + 1) with zero padding so that outside the image reads as -1 (background)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


_TRAIN_CALLS = 0  # counts trainings in this process (the tests use it to check the cache)


def train_classifier(
    x: Tensor,
    y: Tensor,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    shift: float = 1.0,
    zoom: Tuple[float, float] = (1.0, 1.0),
    n_classes: Optional[int] = None,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``x`` (N, 1, H, W) in [-1, 1] and labels ``y`` (N,).

    The recipe: AdamW (``lr``, ``weight_decay``), cosine learning-rate decay to 0 over
    ``steps`` minibatches of ``batch_size`` drawn with replacement-free epochs, random
    translations of up to ``shift`` pixels (whole pixels when there is no zoom) and random
    zoom in ``zoom`` (background -1). Deterministic given ``seed``: the weights are
    initialised under a forked, seeded RNG and every random draw uses a local generator; the
    global RNG and thread settings are left alone. Returns the model in eval mode.
    """
    global _TRAIN_CALLS
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be (N, 1, H, W) images, got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be (N,) labels matching x, got shape {tuple(y.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(n_classes=n_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    perm = torch.randperm(x.shape[0], generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > x.shape[0]:
            perm, pos = torch.randperm(x.shape[0], generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        xb = _augment(x[idx], gen, shift, zoom)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _TRAIN_CALLS += 1
    return model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def _split(n: int, seed: int, held_out: float = 0.2) -> Tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    k = max(1, int(round(n * held_out)))
    return perm[k:], perm[:k]


def _cache_root() -> Path:
    return Path(os.environ.get("STRAIGHTFLOW_CACHE") or "~/.cache/straightflow").expanduser()


def classifier_cache_path(name: str) -> Path:
    """Where ``feature_extractor(name)`` keeps its weights (``.json`` beside it)."""
    return _cache_root() / "classifiers" / f"{name}-{RECIPE_VERSION}.safetensors"


def _fingerprint(x: Tensor, y: Tensor, recipe: Dict[str, Any], seed: int) -> str:
    h = hashlib.sha256()
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    h.update(repr(sorted(recipe.items())).encode())
    h.update(f"seed={seed};{RECIPE_VERSION}".encode())
    return h.hexdigest()[:16]


_MEMO: Dict[Tuple[str, str], DigitClassifier] = {}


def _load_cached(path: Path, expect_fingerprint: Optional[str]) -> Optional[DigitClassifier]:
    """Weights from the cache; ``None`` if their fingerprint differs from the expected one."""
    from safetensors import safe_open

    tensors = io.load_tensors(path)  # clear errors for missing/truncated/pickle files
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if expect_fingerprint is not None and meta.get("fingerprint") != expect_fingerprint:
        return None
    model = DigitClassifier(n_classes=int(meta["n_classes"]))
    model.load_state_dict(tensors, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def feature_extractor(
    name: str = "digits",
    x: Optional[ArrayLike] = None,
    y: Optional[ArrayLike] = None,
    seed: int = 0,
    steps: Optional[int] = None,
) -> DigitClassifier:
    """A trained :class:`DigitClassifier` in eval mode, trained once and cached.

    - ``"digits"``: scikit-learn's bundled 8x8 digits (scaled to ``[-1, 1]``), 80/20 seeded
      split, random ±1 pixel shifts.
    - ``"mnist"``: a *proxy* for MNIST. The shipped MNIST split has no labels, so the
      classifier is trained on the same digits upsampled to 28x28 (bilinear) with random
      shifts (±3 px) and zooms (0.7-1.05, MNIST digits fill ~20 of 28 pixels). Its features
      are meaningful for 28x28 handwritten digits, but it is not an MNIST-trained network.
    - any other name with ``x`` (N, 1, H, W) in [-1, 1] and integer labels ``y``: your data,
      same recipe as digits (80/20 split). Later, ``feature_extractor(name)`` alone loads
      that cached classifier.

    Weights go to ``$STRAIGHTFLOW_CACHE/classifiers/<name>-<RECIPE_VERSION>.safetensors``
    (atomic write; default cache ``~/.cache/straightflow``) with ``<...>.json`` holding the
    held-out accuracy; later calls load them (and keep them in an in-process memo). A cached
    file whose data/recipe fingerprint does not match, or that is corrupt, is retrained.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"extractor name must be a plain file-name-safe string, got {name!r}")
    if (x is None) != (y is None):
        raise ValueError("give both x and y (images and labels) or neither")
    if x is None:
        if name not in ("digits", "mnist"):
            path = classifier_cache_path(name)
            if path.is_file():  # a custom extractor trained earlier: load it as it is
                key = (str(path), "as-cached")
                if key not in _MEMO:
                    _MEMO[key] = _load_cached(path, expect_fingerprint=None)
                return _MEMO[key]
            raise ValueError(
                f"unknown built-in extractor {name!r}; built-ins: 'digits', 'mnist' "
                f"(or pass x=images, y=labels to train one on your data; no cache at {path})"
            )
        recipe = dict(_RECIPES[name])
        xt, yt = load_digits_images(recipe["image_size"])
    else:
        if name in ("digits", "mnist"):
            raise ValueError(f"{name!r} is a built-in extractor; give your data set another name")
        recipe = dict(_RECIPES["custom"])
        xt = torch.as_tensor(x).detach().to("cpu", torch.float32)
        if xt.ndim == 3:
            xt = xt.unsqueeze(1)
        yt = torch.as_tensor(y).detach().to("cpu").long().reshape(-1)
        recipe["image_size"] = list(xt.shape[-2:])
    if steps is not None:
        recipe["steps"] = int(steps)
    fp = _fingerprint(xt, yt, recipe, seed)
    path = classifier_cache_path(name)
    key = (str(path), fp)
    if key in _MEMO:
        return _MEMO[key]
    n_classes = int(yt.max()) + 1
    model: Optional[DigitClassifier] = None
    if path.is_file():
        try:
            model = _load_cached(path, expect_fingerprint=fp)
        except Exception as e:  # corrupt/incompatible cache: retrain and overwrite
            warnings.warn(f"ignoring unusable classifier cache {path}: {e}")
    if model is None:
        tr, ho = _split(xt.shape[0], seed)
        t0 = time.perf_counter()
        model = train_classifier(
            xt[tr], yt[tr], steps=recipe["steps"], seed=seed, batch_size=recipe["batch_size"],
            lr=recipe["lr"], weight_decay=recipe["weight_decay"], shift=recipe["shift"],
            zoom=tuple(recipe["zoom"]), n_classes=n_classes,
        )
        seconds = time.perf_counter() - t0
        info = {
            "name": name,
            "recipe_version": RECIPE_VERSION,
            "recipe": recipe,
            "seed": seed,
            "fingerprint": fp,
            "n_classes": n_classes,
            "n_train": int(tr.numel()),
            "n_held_out": int(ho.numel()),
            "train_accuracy": _accuracy(model, xt[tr], yt[tr]),
            "held_out_accuracy": _accuracy(model, xt[ho], yt[ho]),
            "train_seconds": round(seconds, 2),
        }
        if name == "mnist":
            info["note"] = "proxy: trained on sklearn digits upsampled to 28x28 (MNIST ships no labels)"
        io.save_tensors(path, model.state_dict(),
                        metadata={"fingerprint": fp, "n_classes": str(n_classes),
                                  "recipe_version": RECIPE_VERSION, "name": name})
        io.save_json(path.with_suffix(".json"), info)
    for p in model.parameters():
        p.requires_grad_(False)
    _MEMO[key] = model
    return model


def _as_digit_images(x: ArrayLike, what: str) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.ndim == 2:  # (N, D) with D a square: flattened 1-channel images
        s = int(round(math.sqrt(t.shape[1])))
        if s * s != t.shape[1]:
            raise ValueError(f"{what}: (N, D) input needs D = side^2, got D = {t.shape[1]}")
        t = t.reshape(-1, 1, s, s)
    elif t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{what}: expected 1-channel images (N, 1, H, W), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return t


@torch.no_grad()
def classifier_features(x: ArrayLike, extractor: Union[str, nn.Module] = "digits", batch_size: int = 512) -> Tensor:
    """Penultimate-layer features ``(N, 128)`` of a classifier (name or module), batched."""
    model = feature_extractor(extractor) if isinstance(extractor, str) else extractor
    imgs = _as_digit_images(x, "images")
    return torch.cat([model.features(imgs[i : i + batch_size]) for i in range(0, imgs.shape[0], batch_size)])


def classifier_fd(
    samples: ArrayLike, reference: ArrayLike, extractor: Union[str, nn.Module] = "digits", batch_size: int = 512
) -> float:
    """Fréchet distance between classifier features of ``samples`` and ``reference``.

    ``extractor``: a name for :func:`feature_extractor` (``"digits"``, ``"mnist"``, a cached
    custom name) or a module with ``.features``. Images: ``(N, 1, H, W)``, ``(N, H, W)`` or
    flattened ``(N, side^2)``, in ``[-1, 1]``.
    """
    model = feature_extractor(extractor) if isinstance(extractor, str) else extractor
    fa = classifier_features(samples, model, batch_size)
    fb = classifier_features(reference, model, batch_size)
    return frechet_distance(fa, fb)


# ----------------------------------------------------------------------------- registry, floors


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
    **kwargs: Any,
) -> MetricReport:
    """A distribution metric between ``samples`` and held-out ``data``, with its floor.

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
    extra = dict(kwargs)
    if spec.name == "fd":
        extra["extractor"] = extractor
    value = spec.fn(s, a, seed=seed, **extra)
    floor = spec.fn(a, b, seed=seed, **extra)
    return MetricReport(spec.display, value, floor, n=m)
