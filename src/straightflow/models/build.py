"""The model registry and ``build_model``: every architecture by name, rebuilt from its ``config``."""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..registry import Registry
from .autoencoder import Autoencoder
from .dit import DiT
from .mlp import MLP
from .policy import ObsMLP
from .unet import UNet

__all__ = ["MODELS", "available", "build_model"]

MODELS: Registry = Registry("model")
MODELS.register("mlp")(MLP)
MODELS.register("unet")(UNet)
MODELS.register("dit")(DiT)
MODELS.register("autoencoder", aliases=("ae",))(Autoencoder)
MODELS.register("obs_mlp", aliases=("policy",))(ObsMLP)


def available() -> List[str]:
    """Registered model names."""
    return MODELS.names()


def build_model(config: Mapping[str, Any], *, seed: Optional[int] = None, **overrides: Any) -> nn.Module:
    """Build a model from ``{"name": <registered name>, **kwargs}`` (e.g. ``model.config``).

    ``seed``: draw the initial weights from ``torch.manual_seed(seed)`` inside a forked RNG (the
    global generator is left as it was), so a run's initialisation is a function of its seed; None
    draws from the global generator. Raises ``UnknownNameError`` (a ValueError listing valid names) for an unknown name and a
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
        if seed is None:
            return cls(**kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r}: bad arguments {kwargs}: {e}") from e
