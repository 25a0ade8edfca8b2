"""Data <-> token sequences for autoregressive flows (TarFlow, Zhai et al. 2024).

Images ``(B, C, H, W)`` become ``T = (H/p)(W/p)`` tokens of ``D = C p^2`` values (row-major patches);
vectors ``(B, N)`` become ``T = N / p`` tokens of ``D = p`` values (``p = 1``: one token per
dimension). Both maps are permutations of the entries, so their log-determinant is 0.
"""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor

__all__ = ["TokenShape", "token_shape", "to_tokens", "from_tokens"]

TokenShape = Tuple[int, int]


def token_shape(sample_shape: Sequence[int], patch_size: int) -> TokenShape:
    """``(T, D)`` for one sample of ``sample_shape`` (``(C, H, W)`` or ``(N,)``); a ValueError if the
    patch size does not divide it."""
    shape = tuple(int(s) for s in sample_shape)
    p = int(patch_size)
    if p < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if len(shape) == 3:
        c, h, w = shape
        if h % p or w % p:
            raise ValueError(f"patch_size {p} does not divide the image size {h}x{w}; pick a divisor of both")
        return (h // p) * (w // p), c * p * p
    if len(shape) == 1:
        if shape[0] % p:
            raise ValueError(f"patch_size {p} does not divide the vector length {shape[0]}; pick a divisor")
        return shape[0] // p, p
    raise ValueError(f"sample shape {shape} is neither an image (C, H, W) nor a vector (N,)")


def check_batch(x: Tensor, sample_shape: Sequence[int]) -> None:
    """A one-line ValueError unless ``x`` is ``(B, *sample_shape)``."""
    if x.ndim != len(sample_shape) + 1 or tuple(x.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"expected a batch of shape (B, {', '.join(map(str, sample_shape))}), got {tuple(x.shape)}")


def to_tokens(x: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, T, C p^2)`` patches, or ``(B, N)`` -> ``(B, N/p, p)``."""
    p = patch_size
    if x.ndim == 4:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)
    return x.reshape(x.shape[0], -1, p)


def from_tokens(t: Tensor, sample_shape: Sequence[int], patch_size: int) -> Tensor:
    """The inverse of :func:`to_tokens`."""
    p = patch_size
    if len(sample_shape) == 3:
        c, h, w = sample_shape
        b = t.shape[0]
        t = t.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return t.reshape(b, c, h, w)
    return t.reshape(t.shape[0], *sample_shape)
