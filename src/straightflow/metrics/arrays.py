"""Sample-set inputs shared by the metrics: ``ArrayLike`` and the float64 ``(N, D)`` conversion.

Every distribution metric flattens its inputs to ``(N, D)``: a tensor or array of shape
``(N, ...)`` becomes float64 numpy ``(N, prod(...))``; a 1-D input is ``N`` scalars
``(N, 1)``. Empty sets and NaN/inf values are refused with the name of the argument.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]


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
