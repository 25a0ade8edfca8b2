"""Velocity models: ``v = model(x, t, y=None)`` with ``t`` in [0, 1] (0 = noise, 1 = data).

Every model carries ``model.config = {"name": ..., **constructor kwargs}`` (JSON-able), so
``build_model(model.config)`` rebuilds the same architecture; ``model.num_classes`` and
``model.null_class`` (``num_classes`` or None) describe class conditioning, and
``model.sample_shape`` the shape of one sample.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Mapping

from torch import nn

from ..registry import Registry
from .embed import ClassEmbedding, SinusoidalTimeEmbedding, drop_labels, timestep_features
from .autoencoder import Autoencoder
from .blockwise import BlockwiseFlow
from .dit import DiT
from .mlp import MLP
from .shape import sample_shape
from .unet import UNet

MODELS: Registry = Registry("model")
MODELS.register("mlp")(MLP)
MODELS.register("unet")(UNet)
MODELS.register("dit")(DiT)
MODELS.register("blockwise", aliases=("bfm",))(BlockwiseFlow)
MODELS.register("autoencoder", aliases=("ae",))(Autoencoder)

__all__ = [
    "MODELS", "MLP", "UNet", "DiT", "Autoencoder", "BlockwiseFlow", "SinusoidalTimeEmbedding", "ClassEmbedding", "timestep_features", "drop_labels",
    "build_model", "available", "count_parameters", "sample_shape",
]


def available() -> List[str]:
    """Registered model names."""
    return MODELS.names()


def build_model(config: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Build a model from ``{"name": <registered name>, **kwargs}`` (e.g. ``model.config``).

    Raises ``UnknownNameError`` (a ValueError listing valid names) for an unknown name and a
    ValueError naming the offending and accepted arguments for bad kwargs.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"build_model expects a config dict with a 'name' key, got {type(config).__name__}")
    kwargs: Dict[str, Any] = {**config, **overrides}
    if "name" not in kwargs:
        raise ValueError(f"model config has no 'name'; valid names: {', '.join(available())}")
    name = MODELS.canonical(kwargs.pop("name"))
    cls = MODELS.get(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        raise ValueError(
            f"model {name!r}: unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    missing = [
        p.name for p in params.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise ValueError(f"model {name!r}: missing required argument(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r}: bad arguments {kwargs}: {e}") from e


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
