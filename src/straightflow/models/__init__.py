"""Velocity models: ``v = model(x, t, y=None)`` with ``t`` in [0, 1] (0 = noise, 1 = data).

Every model carries ``model.config = {"name": ..., **constructor kwargs}`` (JSON-able), so
``build_model(model.config)`` rebuilds the same architecture; ``model.num_classes`` and
``model.null_class`` (``num_classes`` or None) describe class conditioning, and
``model.sample_shape`` the shape of one sample.
"""
from __future__ import annotations

from torch import nn

from .autoencoder import Autoencoder
from .blockwise import BlockwiseFlow  # registers "blockwise" (its blocks are built by name)
from .build import MODELS, available, build_model
from .dit import DiT
from .embed import ClassEmbedding, SinusoidalTimeEmbedding, drop_labels, timestep_features
from .mlp import MLP
from .policy import ObsMLP
from .shape import sample_shape
from .unet import UNet

__all__ = [
    "MODELS", "MLP", "UNet", "DiT", "Autoencoder", "BlockwiseFlow", "ObsMLP", "SinusoidalTimeEmbedding", "ClassEmbedding", "timestep_features", "drop_labels",
    "build_model", "available", "count_parameters", "sample_shape",
]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
