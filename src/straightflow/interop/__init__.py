"""Bridges to other libraries' conventions (``straightflow.interop.diffusers`` for 🤗 diffusers).

Nothing here imports the other library until it is needed: the convention helpers and
:class:`DiffusersVelocity` work with torch alone; ``StraightflowScheduler`` (:mod:`.scheduler`)
imports diffusers when first used (``pip install diffusers``).
"""
from __future__ import annotations

from .diffusers import (  # noqa: F401
    DiffusersVelocity,
    diffusers_from_velocity,
    sigma_from_t,
    t_from_sigma,
    t_from_timestep,
    timestep_from_t,
    velocity_from_diffusers,
)

__all__ = [
    "DiffusersVelocity", "StraightflowScheduler", "sigma_from_t", "t_from_sigma", "timestep_from_t",
    "t_from_timestep", "velocity_from_diffusers", "diffusers_from_velocity",
]


def __getattr__(name):  # PEP 562: build the diffusers scheduler class only when asked for
    if name == "StraightflowScheduler":
        from .scheduler import StraightflowScheduler

        return StraightflowScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
