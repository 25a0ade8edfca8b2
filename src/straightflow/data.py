"""Built-in data sets and loaders.

Conventions: data ``x1`` lives at ``t = 1``; images are float32 ``(N, C, H, W)`` in ``[-1, 1]``;
vectors are float32 ``(N, D)``. Every generator takes a ``seed`` or a ``torch.Generator`` and is
deterministic. Nothing here downloads anything and nothing loads a pickle.

- 2D toys: :func:`toy_2d` (``checkerboard``, ``moons``, ``8gaussians``, ``spirals``, ``rings``,
  ``gmm``), spread comparable to ``N(0, I)``, all inside ``[-4, 4]^2``.
- Embedded images: :func:`digits` (scikit-learn's 8x8 digits), :func:`shapes` (procedural).
- Loaders: :func:`load_array` (.npz/.npy), :func:`load_idx` (MNIST IDX, raw or gzip),
  :func:`load_image_folder` (flat or class subfolders), :func:`mnist` (the shared test split).
- :func:`load_dataset` resolves a registered name or a path; :func:`available` lists the names.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .registry import Registry, UnknownNameError

PathLike = Union[str, os.PathLike]

__all__ = [
    "Dataset",
    "DataError",
    "TOYS",
    "DATASETS",
    "SHAPE_CLASSES",
    "IMAGE_EXTENSIONS",
    "toy_2d",
    "gmm_params",
    "digits",
    "shapes",
    "load_array",
    "load_idx",
    "load_image_folder",
    "mnist",
    "mnist_path",
    "load_dataset",
    "available",
    "random_hflip",
    "FLIP_SAFE",
]


class DataError(ValueError):
    """A data set or data file is invalid (bad shape, NaN/Inf, bad labels, corrupt file...)."""


# ----------------------------------------------------------------------------- Dataset


@dataclass(eq=False, repr=False)
class Dataset:
    """A validated in-memory data set.

    ``x``: float32 ``(N, ...)`` (images ``(N, C, H, W)`` in ``[-1, 1]``, vectors ``(N, D)``);
    ``y``: optional int64 labels ``(N,)`` in ``[0, num_classes)``; ``classes``: optional class
    names (``len == num_classes``). Floating ``x`` is cast to float32; numpy arrays are accepted.
    """

    x: Tensor
    y: Optional[Tensor] = None
    num_classes: Optional[int] = None
    name: str = "data"
    classes: Optional[List[str]] = field(default=None)

    def __post_init__(self) -> None:
        x = self.x
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, Tensor):
            raise DataError(f"{self.name}: x must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if not x.is_floating_point():
            raise DataError(
                f"{self.name}: x has dtype {x.dtype}; a Dataset holds float data (images scaled to "
                "[-1, 1]). Scale it first, or use load_array, which maps uint8 to [-1, 1]"
            )
        if x.ndim < 2:
            raise DataError(
                f"{self.name}: x has shape {tuple(x.shape)}; expected (N, D) vectors or (N, C, H, W) images"
            )
        if x.shape[0] == 0 or x.numel() == 0:
            raise DataError(f"{self.name}: the data set is empty (x has shape {tuple(x.shape)})")
        x = x.detach().to(torch.float32).contiguous()
        # Fast path: a finite sum means every value is finite (bool reductions are slow on CPU).
        if not bool(torch.isfinite(x.sum())):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
        else:
            n_nan = n_inf = 0
        if n_nan or n_inf:
            raise DataError(
                f"{self.name}: x contains {n_nan} NaN and {n_inf} Inf values (of {x.numel()}); "
                "clean the data (drop or fix those samples) before using it"
            )
        self.x = x
        if self.num_classes is not None:
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
                    or self.num_classes < 1:
                raise DataError(f"{self.name}: num_classes must be a positive int, got {self.num_classes!r}")
            self.num_classes = int(self.num_classes)
        if self.y is not None:
            y = self.y
            if isinstance(y, np.ndarray):
                y = torch.from_numpy(np.ascontiguousarray(y))
            if not isinstance(y, Tensor):
                raise DataError(f"{self.name}: y must be a torch.Tensor or numpy array, got {type(y).__name__}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise DataError(f"{self.name}: labels y have dtype {y.dtype}; expected integer class indices")
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"{self.name}: labels y have shape {tuple(y.shape)}; expected ({x.shape[0]},), "
                    "one label per sample"
                )
            y = y.detach().to(torch.long).contiguous()
            lo, hi = int(y.min()), int(y.max())
            if self.num_classes is None:
                self.num_classes = (len(self.classes) if self.classes is not None else hi + 1)
            if lo < 0 or hi >= self.num_classes:
                raise DataError(
                    f"{self.name}: labels y span [{lo}, {hi}]; expected values in [0, {self.num_classes})"
                )
            self.y = y
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
            if self.num_classes is not None and len(self.classes) != self.num_classes:
                raise DataError(
                    f"{self.name}: {len(self.classes)} class names given for num_classes={self.num_classes}"
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        extra = f", num_classes={self.num_classes}" if self.num_classes is not None else ""
        return f"Dataset(name={self.name!r}, n={len(self)}, shape={self.shape}{extra})"

    @property
    def shape(self) -> Tuple[int, ...]:
        """Per-sample shape, e.g. ``(2,)`` or ``(1, 28, 28)``."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        """True for ``(N, C, H, W)`` data."""
        return self.x.ndim == 4

    def _take(self, idx: Tensor, name: str) -> "Dataset":
        return Dataset(
            x=self.x[idx],
            y=None if self.y is None else self.y[idx],
            num_classes=self.num_classes,
            name=name,
            classes=None if self.classes is None else list(self.classes),
        )

    def split(self, frac: float = 0.1, seed: int = 0) -> Tuple["Dataset", "Dataset"]:
        """Random ``(train, held_out)`` split; ``frac`` is the HELD-OUT fraction in (0, 1)
        (or an int count of held-out samples). Deterministic given ``seed``."""
        n = len(self)
        if isinstance(frac, (int, np.integer)) and not isinstance(frac, bool):
            k = int(frac)
        elif isinstance(frac, float) and 0.0 < frac < 1.0:
            k = int(round(frac * n))
        else:
            raise DataError(f"split: frac must be a float in (0, 1) or an int count, got {frac!r}")
        if not 1 <= k <= n - 1:
            raise DataError(
                f"split: held-out size {k} leaves an empty part for {n} samples; need 1 <= held-out <= {n - 1}"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        return self._take(perm[k:], f"{self.name}[train]"), self._take(perm[:k], f"{self.name}[held_out]")

    def subset(self, n: int, seed: int = 0) -> "Dataset":
        """``n`` samples drawn without replacement, deterministic given ``seed``."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(self):
            raise DataError(f"subset: n must be an int in [1, {len(self)}], got {n!r}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(int(seed)))
        return self._take(perm[: int(n)], f"{self.name}[{int(n)}]")


# ----------------------------------------------------------------------------- helpers


def _check_n(n: object, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def _np_rng(seed: Optional[int], generator: Optional[torch.Generator]) -> np.random.Generator:
    """A numpy Generator seeded from ``generator`` (if given, it advances) or from ``seed``."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        s = int(torch.randint(0, 2**62, (1,), generator=generator))
        return np.random.default_rng(s)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))


# ----------------------------------------------------------------------------- 2D toys

ToyFn = Callable[[int, np.random.Generator], np.ndarray]
TOYS: Registry[ToyFn] = Registry("2D toy data set")


@TOYS.register("checkerboard")
def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # 4x4 board of 1.5-wide cells on [-3, 3]^2; the 8 "dark" cells are filled uniformly.
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=np.float64)
    c = cells[rng.integers(0, len(cells), n)]
    return 1.5 * (c + rng.random((n, 2))) - 3.0


@TOYS.register("moons", aliases=("two_moons", "2moons"))
def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    # scikit-learn's make_moons, drawn i.i.d.: make_moons spaces the angles evenly (a quasi-uniform
    # grid, not a sample), which makes W2 between two of its draws far smaller than between i.i.d.
    # samples. Upper moon (cos a, sin a), lower moon (1 - cos a, 0.5 - sin a), a ~ U(0, pi), noise 0.05.
    a = rng.random(n) * np.pi
    lower = rng.random(n) < 0.5
    x = np.stack([np.where(lower, 1.0 - np.cos(a), np.cos(a)), np.where(lower, 0.5 - np.sin(a), np.sin(a))], 1)
    x = x + 0.05 * rng.standard_normal((n, 2))
    return (x - np.array([0.5, 0.25])) * 2.0  # centred, ~[-3, 3] x [-1.5, 1.5]


@TOYS.register("8gaussians", aliases=("eight_gaussians", "8_gaussians", "gaussians8"))
def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    ang = 2 * np.pi * np.arange(8) / 8
    centers = 2.8 * np.stack([np.cos(ang), np.sin(ang)], 1)
    return centers[rng.integers(0, 8, n)] + 0.2 * rng.standard_normal((n, 2))


@TOYS.register("spirals", aliases=("spiral", "2spirals", "two_spirals"))
def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    # Two interleaved arms, 1.5 turns each, radius up to ~3.
    t = np.sqrt(rng.random(n)) * 3 * np.pi
    r = 0.2 + 2.8 * t / (3 * np.pi)
    arm = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    pts = arm[:, None] * np.stack([r * np.cos(t), r * np.sin(t)], 1)
    return pts + 0.08 * rng.standard_normal((n, 2))


@TOYS.register("rings", aliases=("circles", "concentric_circles"))
def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    # Four concentric circles, radii 0.75..3, mass proportional to circumference.
    radii = np.array([0.75, 1.5, 2.25, 3.0])
    k = rng.choice(4, size=n, p=radii / radii.sum())
    a = rng.random(n) * 2 * np.pi
    r = radii[k] + 0.06 * rng.standard_normal(n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


# Fixed mixture (the distribution never depends on the sampling seed, so held-out samples
# drawn with another seed come from the same target).
_GMM_WEIGHTS = np.array([0.25, 0.2, 0.15, 0.15, 0.15, 0.10])
_GMM_MEANS = np.array([[-1.8, -1.2], [1.5, 1.6], [1.9, -1.5], [-1.2, 1.9], [0.1, 0.0], [-2.4, 0.6]])
_GMM_SCALES = np.array([[0.45, 0.25], [0.30, 0.50], [0.35, 0.35], [0.25, 0.20], [0.40, 0.15], [0.20, 0.30]])
_GMM_ANGLES = np.array([0.5, -0.3, 0.0, 1.1, 0.8, -0.9])


def gmm_params(dtype: torch.dtype = torch.float64) -> Dict[str, Tensor]:
    """The fixed ``gmm`` toy mixture: ``weights (K,)``, ``means (K, 2)``, ``covs (K, 2, 2)``."""
    c, s = np.cos(_GMM_ANGLES), np.sin(_GMM_ANGLES)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (K, 2, 2)
    covs = rot @ (np.eye(2)[None] * (_GMM_SCALES**2)[:, None, :]) @ np.swapaxes(rot, 1, 2)
    return {
        "weights": torch.tensor(_GMM_WEIGHTS, dtype=dtype),
        "means": torch.tensor(_GMM_MEANS, dtype=dtype),
        "covs": torch.tensor(covs, dtype=dtype),
    }


@TOYS.register("gmm", aliases=("gaussian_mixture", "mixture"))
def _gmm(n: int, rng: np.random.Generator) -> np.ndarray:
    p = gmm_params()
    chol = np.linalg.cholesky(p["covs"].numpy())
    k = rng.choice(len(_GMM_WEIGHTS), size=n, p=_GMM_WEIGHTS)
    z = rng.standard_normal((n, 2))
    return _GMM_MEANS[k] + np.einsum("nij,nj->ni", chol[k], z)


def toy_2d(name: str, n: int, seed: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` samples ``(n, 2)`` float32 of a 2D toy (see ``TOYS.names()``); ``generator`` overrides ``seed``."""
    fn = TOYS.get(name)
    n = _check_n(n)
    x = fn(n, _np_rng(seed, generator))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# ----------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

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


# ----------------------------------------------------------------------------- array conversion

_SHAPES_ACCEPTED = (
    "accepted shapes: (N, D) vectors, (N, H, W) gray images, (N, H, W, C) or (N, C, H, W) images "
    "with C in {1, 3, 4}"
)


def _to_float(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 127.5 - 1.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise DataError(
        f"{where}: data has dtype {arr.dtype}; accepted: uint8 (mapped to [-1, 1]) or float "
        "(kept as is)"
    )


def _to_layout(arr: np.ndarray, where: str) -> np.ndarray:
    """Bring an array to (N, D) or (N, C, H, W)."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        c_first, c_last = arr.shape[1] in (1, 3, 4), arr.shape[3] in (1, 3, 4)
        if c_first and c_last:  # ambiguous tiny images: prefer the reading with square images
            c_last = arr.shape[1] == arr.shape[2] and arr.shape[2] != arr.shape[3]
            c_first = not c_last
        if c_first:
            return arr
        if c_last:
            return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    raise DataError(f"{where}: array has shape {arr.shape}; {_SHAPES_ACCEPTED}")


def _labels(arr: np.ndarray, n: int, where: str) -> np.ndarray:
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{where}: labels have shape {arr.shape}; expected ({n},), one label per sample")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise DataError(f"{where}: labels have dtype {arr.dtype}; expected integer class indices")


def _make(arr: np.ndarray, labels: Optional[np.ndarray], name: str, where: str,
          label_where: Optional[str] = None) -> Dataset:
    if arr.ndim == 0 or arr.shape[0] == 0 or arr.size == 0:
        raise DataError(f"{where}: the array is empty (shape {arr.shape})")
    x = _to_layout(_to_float(arr, where), where)
    y = None if labels is None else torch.from_numpy(_labels(labels, x.shape[0], label_where or where))
    return Dataset(torch.from_numpy(np.ascontiguousarray(x)), y, None, name)


# ----------------------------------------------------------------------------- .npz / .npy

_NPZ_DATA_KEYS = ("data", "x", "images", "arr_0")
_NPZ_LABEL_KEYS = ("labels", "y")


def _refuse_pickle(path: Path, e: Exception) -> DataError:
    return DataError(
        f"{path}: holds an object (pickled) array; straightflow refuses pickles because loading one "
        f"can execute arbitrary code. Save plain numeric arrays (uint8 or float) instead ({e})"
    )


def load_array(path: PathLike, key: Optional[str] = None, label_key: Optional[str] = None) -> Dataset:
    """Load a ``.npz``/``.npy`` file (``allow_pickle=False`` always) as a Dataset.

    uint8 maps to [-1, 1] (``x / 127.5 - 1``); float arrays are kept as they are (data in
    [0, 1] stays in [0, 1]). Layouts: (N, D) kept, (N, H, W) -> (N, 1, H, W), (N, H, W, C)
    -> channels-first, (N, C, H, W) kept (C in {1, 3, 4}). For .npz the data key defaults to the
    first of ``data, x, images, arr_0``; labels come from ``label_key`` or ``labels``/``y``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise DataError(f"{path}: load_array reads .npz or .npy files, got {suffix or 'no suffix'!r}")
    try:
        if suffix == ".npy":
            if key is not None or label_key is not None:
                raise DataError(f"{path}: key/label_key apply to .npz archives only; a .npy holds one array")
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise _refuse_pickle(path, e) from e
                raise DataError(f"{path}: not a valid .npy file ({e})") from e
            return _make(arr, None, path.stem, str(path))
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if key is None:
                key = next((k for k in _NPZ_DATA_KEYS if k in keys), None)
                if key is None:
                    raise DataError(
                        f"{path}: no data key found; looked for {', '.join(_NPZ_DATA_KEYS)}; keys present: "
                        f"{', '.join(keys) or '(none)'}; pass key=..."
                    )
            elif key not in keys:
                raise DataError(f"{path}: key {key!r} not found; keys present: {', '.join(keys) or '(none)'}")
            if label_key is None:
                label_key = next((k for k in _NPZ_LABEL_KEYS if k in keys and k != key), None)
            elif label_key not in keys:
                raise DataError(
                    f"{path}: label_key {label_key!r} not found; keys present: {', '.join(keys)}"
                )
            try:
                arr = z[key]
                lab = None if label_key is None else z[label_key]
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise _refuse_pickle(path, e) from e
                raise DataError(f"{path}: cannot read array {key!r} ({e})") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid {suffix} file or it is truncated ({e})") from e
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a valid {suffix} file ({e})") from e
    return _make(arr, lab, path.stem, f"{path}[{key}]")


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: gzip stream is corrupt or truncated ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes; the header alone is at least 4)")
    z0, z1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if z0 != 0 or z1 != 0 or code not in _IDX_DTYPES or ndim < 1:
        raise DataError(
            f"{path}: bad IDX magic {raw[:4].hex(' ')}; expected 00 00 <dtype> <ndim> with dtype in "
            "08 (uint8), 09 (int8), 0b (int16), 0c (int32), 0d (float32), 0e (float64) and ndim >= 1"
        )
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {head} for {ndim} dims)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dt = np.dtype(_IDX_DTYPES[code])
    want = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    have = len(raw) - head
    if have != want:
        raise DataError(
            f"{path}: IDX size mismatch: header dims {tuple(dims)} need {want} payload bytes, file has "
            f"{have} ({'truncated' if have < want else 'trailing bytes'})"
        )
    arr = np.frombuffer(raw, dtype=dt, count=want // dt.itemsize, offset=head).reshape(dims)
    return arr.astype(dt.newbyteorder("="))


def load_idx(path: PathLike, labels_path: Optional[PathLike] = None) -> Dataset:
    """Load an MNIST-style IDX file (raw or gzip, detected by magic bytes), with optional labels.

    Images ``(N, H, W)`` uint8 become ``(N, 1, H, W)`` in [-1, 1]; other layouts as in load_array.
    """
    path = Path(path)
    arr = _read_idx(path)
    if arr.ndim == 1:
        raise DataError(f"{path}: a 1-D IDX file holds labels, not data; pass it as labels_path=")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)  # int8/int16/int32 payloads are kept as numbers
    lab = None if labels_path is None else _read_idx(Path(labels_path))
    name = path.name.split(".")[0]
    return _make(arr, lab, name, str(path), None if labels_path is None else str(labels_path))


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _images_in(d: Path) -> List[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(root: PathLike, resolution: Optional[Union[int, Tuple[int, int]]] = None,
                      channels: Optional[int] = None) -> Dataset:
    """Load images directly in ``root`` (no labels) or in class subfolders (labels = index of the
    sorted subfolder name; names in ``.classes``). ``resolution`` (int or (H, W)) resizes;
    without it all images must share one size. ``channels`` 1/3/4, default 1 if all are gray else 3.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    loose = _images_in(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, _images_in(d)) for d in subdirs]
    groups = [(c, fs) for c, fs in groups if fs]
    exts = ", ".join(IMAGE_EXTENSIONS)
    if loose and groups:
        raise DataError(
            f"{root}: has images both directly inside it and in subfolders; use either a flat folder "
            "(no labels) or one subfolder per class"
        )
    if not loose and not groups:
        raise DataError(f"{root}: no images found (accepted extensions: {exts}) in it or its subfolders")
    if groups:
        classes = [c for c, _ in groups]
        files = [(f, i) for i, (_, fs) in enumerate(groups) for f in fs]
    else:
        classes = None
        files = [(f, -1) for f in loose]
    if channels is not None and channels not in (1, 3, 4):
        raise DataError(f"load_image_folder: channels must be 1, 3 or 4, got {channels!r}")
    size: Optional[Tuple[int, int]] = None  # PIL (W, H)
    if resolution is not None:
        if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool) and resolution >= 1:
            size = (int(resolution), int(resolution))
        elif isinstance(resolution, (tuple, list)) and len(resolution) == 2 and all(
                isinstance(v, (int, np.integer)) and v >= 1 for v in resolution):
            size = (int(resolution[1]), int(resolution[0]))
        else:
            raise DataError(f"load_image_folder: resolution must be a positive int or (H, W), got {resolution!r}")

    imgs = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                imgs.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: cannot read image ({e})") from e
    if channels is None:
        gray = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in imgs)
        channels = 1 if gray else 3
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    if size is None:
        sizes: Dict[Tuple[int, int], Path] = {}
        for (f, _), im in zip(files, imgs):
            sizes.setdefault(im.size, f)
        if len(sizes) > 1:
            shown = "; ".join(f"{w}x{h} (e.g. {p.name})" for (w, h), p in list(sizes.items())[:4])
            raise DataError(
                f"{root}: images have different sizes ({shown}); pass resolution= to resize them"
            )
    out = []
    for im in imgs:
        im = im.convert(mode)
        if size is not None and im.size != size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        a = np.asarray(im, dtype=np.uint8)
        out.append(a[:, :, None] if a.ndim == 2 else a)
    arr = np.stack(out).transpose(0, 3, 1, 2)
    x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    y = None if classes is None else torch.tensor([i for _, i in files], dtype=torch.long)
    return Dataset(x, y, None if classes is None else len(classes), root.name or str(root), classes)


# ----------------------------------------------------------------------------- MNIST

MNIST_FILE = "mnist_test_10k.npz"


def _mnist_candidates(path: Optional[PathLike]) -> List[Path]:
    if path is not None:
        p = Path(path)
        return [p / MNIST_FILE if p.is_dir() else p]
    out: List[Path] = []
    env = os.environ.get("STRAIGHTFLOW_DATA")
    if env:
        p = Path(env)
        out += [p / MNIST_FILE] if not p.suffix else [p]
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for s in starts:
        for a in (s, *s.parents):
            out += [a / "shared" / "data" / MNIST_FILE, a.parent / "shared" / "data" / MNIST_FILE]
    seen, uniq = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def mnist_path(path: Optional[PathLike] = None) -> Optional[Path]:
    """Where ``mnist_test_10k.npz`` is: ``path`` (file or dir), ``$STRAIGHTFLOW_DATA``, or
    ``<ancestor>/shared/data/`` of this file or the cwd; None if absent."""
    for p in _mnist_candidates(path):
        if p.is_file():
            return p
    return None


def mnist(path: Optional[PathLike] = None) -> Dataset:
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


# ----------------------------------------------------------------------------- registry of named sets

DatasetFactory = Callable[[Optional[int], int, Optional[int]], Dataset]
DATASETS: Registry[DatasetFactory] = Registry("data set")
TOY_DEFAULT_N = 20000
SHAPES_DEFAULT_N = 10000


def _resize(ds: Dataset, resolution: Optional[int]) -> Dataset:
    if resolution is None:
        return ds
    if not ds.is_image:
        raise DataError(f"{ds.name}: resolution= applies to image data sets only; this one has shape {ds.shape}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"resolution must be a positive int, got {resolution!r}")
    if ds.shape[1:] == (resolution, resolution):
        return ds
    x = torch.nn.functional.interpolate(ds.x, size=(int(resolution),) * 2, mode="bilinear",
                                        align_corners=False, antialias=True).clamp_(-1, 1)
    return Dataset(x, ds.y, ds.num_classes, ds.name, ds.classes)


def _finish(ds: Dataset, n: Optional[int], seed: int, resolution: Optional[int]) -> Dataset:
    ds = _resize(ds, resolution)
    if n is not None and _check_n(n) != len(ds):
        ds = ds.subset(n, seed)
    return ds


def _register_toy(name: str) -> None:
    def make(n: Optional[int], seed: int, resolution: Optional[int]) -> Dataset:
        if resolution is not None:
            raise DataError(f"{name}: resolution= applies to image data sets only; {name} is a 2D toy")
        return Dataset(toy_2d(name, TOY_DEFAULT_N if n is None else n, seed=seed), name=name)

    DATASETS.register(name)(make)


for _t in TOYS.names():
    _register_toy(_t)


@DATASETS.register("digits")
def _ds_digits(n: Optional[int], seed: int, resolution: Optional[int]) -> Dataset:
    return _finish(digits(), n, seed, resolution)


@DATASETS.register("shapes")
def _ds_shapes(n: Optional[int], seed: int, resolution: Optional[int]) -> Dataset:
    return shapes(SHAPES_DEFAULT_N if n is None else n, 16 if resolution is None else resolution, 1, seed)


@DATASETS.register("shapes32")
def _ds_shapes32(n: Optional[int], seed: int, resolution: Optional[int]) -> Dataset:
    return shapes(SHAPES_DEFAULT_N if n is None else n, 32 if resolution is None else resolution, 3, seed)


@DATASETS.register("mnist")
def _ds_mnist(n: Optional[int], seed: int, resolution: Optional[int]) -> Dataset:
    return _finish(mnist(), n, seed, resolution)


_FILE_TYPES = ".npz / .npy arrays, MNIST IDX files (raw or .gz), or a folder of images (" + \
    ", ".join(IMAGE_EXTENSIONS) + ")"


def load_dataset(spec: Union[str, PathLike], n: Optional[int] = None, seed: int = 0,
                 resolution: Optional[int] = None) -> Dataset:
    """A registered name (``available()``) or a path (.npz/.npy, IDX or .gz, image folder).

    ``n``: sample count for generated sets (toys default 20000, shapes 10000), else a random
    subset of that size; ``resolution``: image size (shapes render at it, others are resized).
    """
    if isinstance(spec, str) and spec not in DATASETS and spec in TOYS:
        spec = TOYS.canonical(spec)  # toy aliases ("two_moons", ...)
    if isinstance(spec, str) and spec in DATASETS:
        return DATASETS.get(spec)(n, seed, resolution)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data set must be a name or a path, got {type(spec).__name__}")
    p = Path(spec)
    s = str(spec)
    looks_like_path = isinstance(spec, os.PathLike) or os.sep in s or "/" in s or p.suffix != "" or p.exists()
    if not looks_like_path:
        raise UnknownNameError(
            f"unknown data set {s!r}; valid names: {', '.join(available())}; or a path to {_FILE_TYPES}"
        )
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (and not a data set name: {', '.join(available())})")
    suffix = p.suffix.lower()
    if p.is_dir():
        ds = load_image_folder(p, resolution=resolution)
        return _finish(ds, n, seed, None)
    if suffix in (".npz", ".npy"):
        ds = load_array(p)
    elif suffix == ".gz" or "idx" in p.name.lower() or suffix.startswith(".idx"):
        ds = load_idx(p)
    else:
        raise DataError(f"{p}: unrecognised file type {suffix or '(none)'!r}; accepted: {_FILE_TYPES}")
    return _finish(ds, n, seed, resolution)


def available() -> List[str]:
    """Names accepted by :func:`load_dataset`."""
    return DATASETS.names()
