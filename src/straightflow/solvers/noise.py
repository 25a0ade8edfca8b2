"""The initial noise of a sample: one helper for every entry point that takes "a tensor or a shape".

Determinism (see DESIGN.md): the same seed gives the same tensor on the same machine. The draw
happens on the generator's device (a CPU generator by default, so a seed means the same numbers
whatever ``device`` the result is moved to) and in ``dtype``, and only then is it moved.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["initial_noise"]


def initial_noise(noise_or_shape: Union[Tensor, Sequence[int]], seed: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None,
                  device: Union[str, torch.device, None] = None) -> Tuple[Tensor, Optional[torch.Generator]]:
    """``(x0, generator)``: ``x0 ~ N(0, I)`` of shape ``noise_or_shape``, or that tensor itself.

    A tensor is used as it is (it must be floating point; ``seed``, ``generator`` and ``dtype`` are
    not used). A shape is drawn as ``torch.randn(shape, generator=g, dtype=dtype)`` on ``g``'s
    device, where ``g`` is ``generator`` or else a new CPU generator seeded with ``seed`` (0 when
    None); ``g`` is returned so that callers can go on drawing from it (labels, later noise).
    Either is then moved to ``device`` when it is given. An empty batch (or a shape with a
    dimension below 1) is a ValueError.
    """
    if torch.is_tensor(noise_or_shape):
        if not noise_or_shape.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise_or_shape.dtype}")
        if noise_or_shape.ndim < 1 or noise_or_shape.shape[0] < 1:
            raise ValueError(f"noise of shape {tuple(noise_or_shape.shape)} holds no samples; "
                             "pass a batch of at least one")
        x = noise_or_shape
    else:
        shape = tuple(int(s) for s in noise_or_shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"noise shape {shape}: need at least one sample and every dimension >= 1")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        x = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    return (x if device is None else x.to(device)), generator
