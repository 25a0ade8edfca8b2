"""Built-in image data sets: scikit-learn's digits, procedural shapes, MNIST; the flip augmentation.

- :func:`digits`: the bundled 8x8 digits, ``(1797, 1, 8, 8)`` in ``[-1, 1]`` (``x / 8 - 1``
  from the 0..16 scale), labels 0..9.
- :func:`shapes`: labelled shapes (``SHAPE_CLASSES``) at any resolution >= 8, gray or RGB,
  anti-aliased by supersampling (pixel = covered fraction of ``ss x ss`` sub-pixels).
- :func:`mnist`: the 10k MNIST test images (no labels) from ``mnist_test_10k.npz`` in the
  shared data folder (see :func:`mnist_path`); nothing is downloaded.
- :func:`random_hflip`: left-right flips, valid only for the mirror-symmetric sets in
  :data:`FLIP_SAFE`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..io import FilePath
from .dataset import Dataset, DataError, _check_n, _np_rng
from .files import load_array


# ----------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # heavy (scikit-learn): imported on first use

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1]
    return x, d.target.astype(np.int64)


def digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits: x ``(1797, 1, 8, 8)`` in [-1, 1], labels 0..9."""
    x, y = _digits_arrays()
    return Dataset(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), 10, "digits",
                   [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- shapes

SHAPE_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")


def _shape_masks(kind: int, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Boolean masks ``(m, S, S)`` on the supersampled grid ``g`` (coordinates in [0, 1])."""
    dx = g[None, None, :] - cx[:, None, None]  # (m, 1, S)
    dy = g[None, :, None] - cy[:, None, None]  # (m, S, 1)
    rr = r[:, None, None]
    adx, ady = np.abs(dx), np.abs(dy)
    if kind == 0:  # circle
        return dx * dx + dy * dy <= rr * rr
    if kind == 1:  # square (area comparable to the circle)
        a = 0.85 * rr
        return (adx <= a) & (ady <= a)
    if kind == 2:  # upward triangle: apex at -r, base at +0.8 r
        return (adx <= (dy + rr) / 1.8) & (dy <= 0.8 * rr)
    if kind == 3:  # cross (plus sign)
        w = 0.32 * rr
        return ((adx <= rr) & (ady <= w)) | ((ady <= rr) & (adx <= w))
    if kind == 4:  # diamond
        return adx + ady <= rr
    raise AssertionError(kind)


def _block_sum(u: np.ndarray, ss: int) -> np.ndarray:
    """Sum ``ss x ss`` blocks of a uint8 ``(m, S, S)`` array (strided adds; ss*ss <= 255)."""
    a = u[:, :, 0::ss].copy()
    for i in range(1, ss):
        a += u[:, :, i::ss]
    b = a[:, 0::ss].copy()
    for i in range(1, ss):
        b += a[:, i::ss]
    return b


def shapes(n: int, resolution: int = 16, channels: int = 1, seed: int = 0,
           generator: Optional[torch.Generator] = None) -> Dataset:
    """Procedural labelled shapes (``SHAPE_CLASSES``) with random position, size and colour on a
    dark background, anti-aliased by supersampling: x ``(n, channels, resolution, resolution)``
    in [-1, 1], balanced labels. ``channels`` is 1 (gray) or 3 (RGB); ``resolution >= 8``."""
    n = _check_n(n)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 8:
        raise DataError(f"shapes: resolution must be an int >= 8, got {resolution!r}")
    if channels not in (1, 3):
        raise DataError(f"shapes: channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    R = int(resolution)
    rng = _np_rng(seed, generator)
    K = len(SHAPE_CLASSES)
    labels = rng.permutation(np.arange(n) % K)
    r = rng.uniform(0.2, 0.38, n)
    margin = 0.04
    cx = rng.uniform(r + margin, 1 - r - margin)
    cy = rng.uniform(r + margin, 1 - r - margin)
    bg = rng.uniform(0.0, 0.1, (n, channels))
    if channels == 1:
        fg = rng.uniform(0.6, 1.0, (n, 1))
    else:
        c = rng.uniform(0.0, 1.0, (n, 3))
        fg = c / c.max(1, keepdims=True) * rng.uniform(0.7, 1.0, (n, 1))
    ss = 4 if R <= 16 else (3 if R <= 32 else 2)
    S = R * ss
    g = ((np.arange(S) + 0.5) / S).astype(np.float32)
    cx, cy, r = cx.astype(np.float32), cy.astype(np.float32), r.astype(np.float32)
    cov = np.empty((n, R, R), np.float32)
    chunk = max(1, (1 << 22) // (S * S))
    for k in range(K):
        idx = np.flatnonzero(labels == k)
        for i in range(0, len(idx), chunk):
            j = idx[i: i + chunk]
            m = _shape_masks(k, cx[j], cy[j], r[j], g)
            cov[j] = _block_sum(m.view(np.uint8), ss) * np.float32(1.0 / (ss * ss))
    bg2 = (2.0 * bg - 1.0).astype(np.float32)[:, :, None, None]
    amp = (2.0 * (fg - bg)).astype(np.float32)[:, :, None, None]
    img = cov[:, None] * amp
    img += bg2
    x = torch.from_numpy(img)
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), K,
                   f"shapes{R}" + ("rgb" if channels == 3 else ""), list(SHAPE_CLASSES))


# ----------------------------------------------------------------------------- augmentation

FLIP_SAFE: Tuple[str, ...] = ("shapes", "shapes32")
"""Built-in sets whose classes are mirror-symmetric, so a horizontal flip keeps image and label
valid (every shape in ``SHAPE_CLASSES`` is symmetric about its vertical axis). Digits and MNIST are
not: a mirrored 2, 3, 4, 5, 7 or 9 is not a digit."""


def random_hflip(x: Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flip each image of ``x (N, C, H, W)`` left-right with probability ``p`` (a new tensor).

    Only valid for data whose distribution is mirror-invariant (see :data:`FLIP_SAFE`).
    """
    if x.ndim != 4:
        raise DataError(f"random_hflip expects images (N, C, H, W), got shape {tuple(x.shape)}")
    if not 0.0 <= float(p) <= 1.0:
        raise DataError(f"random_hflip: p must be in [0, 1], got {p!r}")
    flip = torch.rand(x.shape[0], generator=generator, device=x.device if generator is None else generator.device)
    flip = (flip < p).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


# ----------------------------------------------------------------------------- MNIST

MNIST_FILE = "mnist_test_10k.npz"


def _mnist_candidates(path: Optional[FilePath]) -> List[Path]:
    if path is not None:
        p = Path(path)
        return [p / MNIST_FILE if p.is_dir() else p]
    out: List[Path] = []
    env = os.environ.get("STRAIGHTFLOW_DATA")
    if env:
        p = Path(env)
        out += [p / MNIST_FILE] if not p.suffix else [p]
    # the straightflow package folder (this file's parent's parent), as before data/ became a package
    starts = [Path(__file__).resolve().parent.parent, Path.cwd().resolve()]
    for s in starts:
        for a in (s, *s.parents):
            out += [a / "shared" / "data" / MNIST_FILE, a.parent / "shared" / "data" / MNIST_FILE]
    seen, uniq = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def mnist_path(path: Optional[FilePath] = None) -> Optional[Path]:
    """Where ``mnist_test_10k.npz`` is: ``path`` (file or dir), ``$STRAIGHTFLOW_DATA``, or
    ``<ancestor>/shared/data/`` of this file or the cwd; None if absent."""
    for p in _mnist_candidates(path):
        if p.is_file():
            return p
    return None


def mnist(path: Optional[FilePath] = None) -> Dataset:
    """The 10k MNIST test images (no labels): x ``(10000, 1, 28, 28)`` in [-1, 1]."""
    p = mnist_path(path)
    if p is None:
        tried = ", ".join(str(c) for c in _mnist_candidates(path)[:4])
        raise FileNotFoundError(
            f"{MNIST_FILE} not found (tried {tried}, ...). Pass path=, set STRAIGHTFLOW_DATA to the "
            "folder holding it, or place it in ../shared/data next to the repository"
        )
    ds = load_array(p, key="data")
    ds.name = "mnist"
    return ds
