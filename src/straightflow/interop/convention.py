"""The diffusers flow-matching convention, written once.

straightflow: ``t`` in [0, 1], ``t = 0`` noise, ``t = 1`` data, ``x_t = t x1 + (1 - t) x0`` and the
model predicts the velocity ``v = x1 - x0``. diffusers' flow matching (SD3, FLUX): noise level
``sigma = 1 - t``, ``x_sigma = (1 - sigma) x_data + sigma noise``, the network predicts
``noise - data = -v`` and is given ``timestep = sigma * num_train_timesteps``; sampling runs from
``sigma = 1`` to ``sigma = 0``. The functions below are the only place this translation is written.
"""
from __future__ import annotations

from typing import Union

from torch import Tensor

__all__ = ["sigma_from_t", "t_from_sigma", "velocity_from_diffusers", "diffusers_from_velocity",
           "timestep_from_t", "t_from_timestep"]

Number = Union[float, Tensor]


def sigma_from_t(t: Number) -> Number:
    """diffusers' noise level ``sigma = 1 - t`` (``t = 0`` noise is ``sigma = 1``)."""
    return 1 - t


def t_from_sigma(sigma: Number) -> Number:
    """straightflow time ``t = 1 - sigma``."""
    return 1 - sigma


def velocity_from_diffusers(out: Tensor) -> Tensor:
    """diffusers flow models predict ``noise - data``; the straightflow velocity is ``data - noise``."""
    return -out


def diffusers_from_velocity(v: Tensor) -> Tensor:
    """A straightflow velocity as a diffusers flow prediction (``noise - data``)."""
    return -v


def timestep_from_t(t: Number, num_train_timesteps: int = 1000) -> Number:
    """The ``timestep`` a diffusers flow transformer expects: ``sigma * num_train_timesteps``."""
    return sigma_from_t(t) * num_train_timesteps


def t_from_timestep(timestep: Number, num_train_timesteps: int = 1000) -> Number:
    """Inverse of :func:`timestep_from_t`."""
    return t_from_sigma(timestep / num_train_timesteps)
