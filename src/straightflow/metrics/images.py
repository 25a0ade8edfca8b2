"""Paired image metrics: PSNR and SSIM of images against their references.

Images are ``(N, C, H, W)`` in ``[-1, 1]`` (``data_range = 2``), compared pair by pair in
float64 and averaged over the batch:

- ``PSNR = 10 log10(data_range^2 / MSE)`` per image (``+inf`` for an identical pair);
- ``SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))``
  (Wang et al. 2004) with Gaussian-weighted local statistics, ``C1 = (k1 L)^2``,
  ``C2 = (k2 L)^2``, ``L = data_range``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .arrays import ArrayLike


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
