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
- Held-out data (``split="train"`` / ``"test"``): a generated set (2D toys, shapes) draws its test
  samples from a disjoint seed (``seed + GENERATED_TEST_SEED_OFFSET``); a fixed set (digits, MNIST,
  files, image folders) holds out ``HELD_OUT_FRACTION`` of its items by a permutation with the fixed
  seed ``HELD_OUT_SEED`` (the same split whatever a run's seed), and sets smaller than
  ``MIN_SPLIT_SIZE`` are not split (``"train"`` is all of it, ``"test"`` is refused).
  ``straightflow train`` trains on ``"train"`` and ``straightflow eval`` scores on ``"test"``.

Modules: :mod:`.dataset` (``Dataset``, ``DataError``, shared checks), :mod:`.toys` (2D toys),
:mod:`.images` (digits, shapes, MNIST, flips), :mod:`.files` (.npz/.npy, IDX, image folders).
This package module holds the registry of named sets, ``DATASETS``, with :func:`load_dataset`
and :func:`available`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Union

import numpy as np
import torch

from ..registry import Registry, UnknownNameError
from ..io import FilePath
from .dataset import Dataset, DataError, _check_n
from .files import IMAGE_EXTENSIONS, load_array, load_idx, load_image_folder
from .images import (  # noqa: F401
    FLIP_SAFE,
    MNIST_FILE,
    SHAPE_CLASSES,
    digits,
    mnist,
    mnist_path,
    random_hflip,
    shapes,
)
from .toys import TOYS, ToyFn, gmm_params, toy_2d  # noqa: F401

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
    "SPLITS",
    "HELD_OUT_FRACTION",
    "is_generated",
    "held_out_size",
]


# ----------------------------------------------------------------------------- registry of named sets

DatasetFactory = Callable[[Optional[int], int, Optional[int]], Dataset]
DATASETS: Registry[DatasetFactory] = Registry("data set")
TOY_DEFAULT_N = 20000
SHAPES_DEFAULT_N = 10000


def _resize(ds: Dataset, resolution: Optional[int]) -> Dataset:
    if resolution is None:
        return ds
    if not ds.is_image:
        raise DataError(f"{ds.name}: a resolution (resolution=, --resolution) applies to image data only; this data has "
                        f"samples of shape {ds.shape}")
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
            raise DataError(f"{name}: a resolution (resolution=, --resolution) applies to image data only; {name} is a "
                            "2D toy")
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


SPLITS = ("all", "train", "test")
HELD_OUT_FRACTION = 0.2
HELD_OUT_SEED = 0
MIN_SPLIT_SIZE = 10
GENERATED_TEST_SEED_OFFSET = 1_000_000_007
_GENERATED = {"shapes", "shapes32"}


def is_generated(spec: Union[str, FilePath]) -> bool:
    """True for the data sets drawn fresh from a seed (2D toys, shapes): unlimited held-out data."""
    return isinstance(spec, str) and (spec in _GENERATED or spec in TOYS)


def held_out_size(n: int) -> int:
    """Items a fixed data set of ``n`` items holds out for ``split="test"`` (0 below ``MIN_SPLIT_SIZE``)."""
    return 0 if n < MIN_SPLIT_SIZE else max(1, int(round(HELD_OUT_FRACTION * n)))


def _split(ds: Dataset, split: str) -> Dataset:
    k = held_out_size(len(ds))
    if k == 0:
        if split == "test":
            raise DataError(f"{ds.name} has {len(ds)} items, too few to hold any out (a split needs at least "
                            f"{MIN_SPLIT_SIZE}); it can only be used whole")
        return ds
    train, test = ds.split(k, HELD_OUT_SEED)
    if split == "train":
        train.name = ds.name
        return train
    test.name = f"{ds.name}[test]"
    return test


def load_dataset(spec: Union[str, FilePath], n: Optional[int] = None, seed: int = 0,
                 resolution: Optional[int] = None, split: str = "all") -> Dataset:
    """A registered name (``available()``) or a path (.npz/.npy, IDX or .gz, image folder).

    ``n``: sample count for generated sets (toys default 20000, shapes 10000), else a random
    subset of that size; ``resolution``: image size (shapes render at it, others are resized).
    ``split``: ``"all"``, ``"train"`` or ``"test"`` (held-out data; see the module docstring).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(spec, str) and spec not in DATASETS and spec in TOYS:
        spec = TOYS.canonical(spec)  # toy aliases ("two_moons", ...)
    if isinstance(spec, str) and spec in DATASETS:
        if is_generated(spec):
            ds = DATASETS.get(spec)(n, seed + (GENERATED_TEST_SEED_OFFSET if split == "test" else 0), resolution)
            if split == "test":
                ds.name = f"{ds.name}[test]"
            return ds
        if split == "all":
            return DATASETS.get(spec)(n, seed, resolution)
        return _finish(_split(DATASETS.get(spec)(None, seed, resolution), split), n, seed, None)
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
    elif suffix in (".npz", ".npy"):
        ds = _resize(load_array(p), resolution)
    elif suffix == ".gz" or "idx" in p.name.lower() or suffix.startswith(".idx"):
        ds = _resize(load_idx(p), resolution)
    else:
        raise DataError(f"{p}: unrecognised file type {suffix or '(none)'!r}; accepted: {_FILE_TYPES}")
    return _finish(ds if split == "all" else _split(ds, split), n, seed, None)


def available() -> List[str]:
    """Names accepted by :func:`load_dataset`."""
    return DATASETS.names()
