"""Fréchet distance between feature sets, and in the feature space of the project's classifier.

``FD = |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` between Gaussians fitted (sample
mean, unbiased covariance) to two feature sets. :func:`classifier_fd` takes the features from
the penultimate layer (128-D) of a :class:`~.classifier.DigitClassifier` -- the project's
stand-in for Inception-FID on 8x8 digits and 28x28 MNIST.
"""
from __future__ import annotations

import math
import warnings
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from .arrays import ArrayLike, _check_pair, _to_numpy64
from .classifier import feature_extractor


def frechet_distance(feat_a: ArrayLike, feat_b: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (float64).

    ``FD = |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` with sample means and
    (unbiased) covariances; the matrix square root is ``scipy.linalg.sqrtm``. If it is not
    finite (singular product), ``eps * I`` is added to both covariances. Tiny imaginary parts
    from round-off are dropped; a large one raises ``ValueError``.
    """
    from scipy import linalg  # heavy (scipy): imported on first use

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
