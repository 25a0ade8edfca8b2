"""The validated in-memory :class:`Dataset`, :class:`DataError`, and the checks every loader shares.

A :class:`Dataset` holds float32 ``x (N, ...)`` -- images ``(N, C, H, W)`` in ``[-1, 1]``,
vectors ``(N, D)`` -- with optional int64 labels ``y (N,)`` in ``[0, num_classes)`` and class
names. Construction refuses, with a message saying what was wrong and what is accepted:
non-float data, fewer than 2 dimensions, empty sets, NaN/Inf values, non-integer or
out-of-range labels, and class names that disagree with ``num_classes``.

``_check_n`` (positive sample counts) and ``_np_rng`` (a numpy Generator from a ``seed`` or
from a ``torch.Generator``, which it advances) are shared by the generators.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor



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
