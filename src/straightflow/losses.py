"""Per-sample regression losses between the model output and the path's target velocity.

A loss maps ``(pred, target, t)`` to a (B,) tensor; :class:`~straightflow.flow.Flow` averages
it. Weighting multiplies each sample's loss by ``w(t)``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

from .registry import Registry

LOSSES: Registry = Registry("loss")
WEIGHTINGS: Registry = Registry("loss weighting")


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


@WEIGHTINGS.register("none", aliases=("uniform",))
def no_weight(t: Tensor) -> Tensor:
    """``w(t) = 1``."""
    return torch.ones_like(t)


@WEIGHTINGS.register("inv_noise", aliases=("1/t", "inv_t"))
def inv_noise_weight(t: Tensor, eps: float = 1e-3) -> Tensor:
    """``w = 1 / (1 - t + eps)``: rfpp's ``1/t`` weighting written in our time (their ``t`` is the
    noise level ``1 - t``); up-weights the near-data end. Normalised to mean 1 under U[0, 1]."""
    norm = math.log((1 + eps) / eps)
    return 1.0 / ((1 - t + eps) * norm)


class Loss(ABC):
    """Base: ``__call__(pred, target, t) -> (B,)`` per-sample losses, times ``w(t)``."""

    name = "loss"

    def __init__(self, weighting: Union[str, Callable[[Tensor], Tensor]] = "none") -> None:
        self.weighting_name = weighting if isinstance(weighting, str) else "custom"
        self.weight = WEIGHTINGS.get(weighting) if isinstance(weighting, str) else weighting

    @abstractmethod
    def per_sample(self, pred: Tensor, target: Tensor) -> Tensor: ...

    def __call__(self, pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        per = self.per_sample(pred, target)
        return per if self.weight is no_weight else per * self.weight(t.to(pred.dtype))

    def config(self) -> Dict:
        return {"name": self.name, "weighting": self.weighting_name}


@LOSSES.register("mse", aliases=("l2",))
class MSE(Loss):
    """``mean_d (pred - target)^2`` per sample."""

    name = "mse"

    def per_sample(self, pred, target):
        return (_flat(pred) - _flat(target)).pow(2).mean(dim=1)


@LOSSES.register("pseudo_huber", aliases=("huber", "pseudohuber"))
class PseudoHuber(Loss):
    """``sqrt(||pred - target||^2 + c^2) - c`` with ``c = c0 * sqrt(d)``, ``c0 = 0.00054``
    (Song & Dhariwal 2023; Lee et al. 2024 "Improving the Training of Rectified Flows").
    ``c`` grows with the data dimension ``d`` so the loss switches from L2 to L1 at a comparable
    per-dimension error for any data size. Divided by ``d`` so its scale matches :class:`MSE`'s
    gradient order of magnitude in logs (the minimiser is unchanged).
    """

    name = "pseudo_huber"

    def __init__(self, weighting="none", c0: float = 0.00054, c: Optional[float] = None) -> None:
        super().__init__(weighting)
        self.c0, self.c_fixed = float(c0), c

    def config(self):
        return {**super().config(), "c0": self.c0, "c": self.c_fixed}

    def per_sample(self, pred, target):
        d = _flat(pred).shape[1]
        c = self.c_fixed if self.c_fixed is not None else self.c0 * math.sqrt(d)
        sq = (_flat(pred) - _flat(target)).pow(2).sum(dim=1)
        return (torch.sqrt(sq + c * c) - c) / math.sqrt(d)


def get_loss(spec: Union[str, Dict, Loss] = "mse", **kwargs) -> Loss:
    """Build from a name, a config dict or pass an object through."""
    return LOSSES.build(spec, Loss, **kwargs)


def available() -> list:
    return LOSSES.names()
