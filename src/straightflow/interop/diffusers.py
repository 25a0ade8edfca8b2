"""🤗 diffusers interop: run diffusers flow transformers with straightflow, and straightflow solvers
inside diffusers pipelines.

The convention (``sigma = 1 - t``, the network predicts ``-v``, ``timestep = sigma * 1000``) is
written once, in :mod:`.convention`, and re-exported here.

* :class:`DiffusersVelocity` wraps a diffusers transformer as a straightflow velocity model, so
  ``straightflow.sample(DiffusersVelocity(transformer), noise, cond={...})`` works as is.
* ``StraightflowScheduler`` (:mod:`.scheduler`) is a diffusers scheduler that runs any registered
  straightflow solver (``"euler"``, ``"heun"``, ``"dpm++2m"``, ``"unipc"``, ...) or a calibration
  inside a pipeline. It needs ``diffusers`` and is imported when first accessed.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .convention import (Number, diffusers_from_velocity, sigma_from_t, t_from_sigma, t_from_timestep,
                         timestep_from_t, velocity_from_diffusers)

__all__ = [
    "sigma_from_t", "t_from_sigma", "velocity_from_diffusers", "diffusers_from_velocity",
    "timestep_from_t", "t_from_timestep", "DiffusersVelocity", "StraightflowScheduler", "SIGMA_TIMESTEP_MODELS",
]


# ---------------------------------------------------------------------- diffusers model -> velocity
# Transformers that take ``timestep = sigma`` itself (their pipelines pass ``t / 1000`` and the
# model multiplies by 1000 inside); every other diffusers flow model takes ``sigma * 1000``.
SIGMA_TIMESTEP_MODELS = ("FluxTransformer2DModel", "Flux2Transformer2DModel", "ChromaTransformer2DModel",
                         "QwenImageTransformer2DModel")


class DiffusersVelocity(nn.Module):
    """A diffusers flow transformer as a straightflow velocity model ``v = self(x, t, **cond)``.

    ``model`` is called as ``model(hidden_states=x, timestep=sigma * num_train_timesteps,
    **fixed_kwargs, **cond)`` (SD3Transformer2DModel, FluxTransformer2DModel, or any module with
    that calling convention) and may return an object with ``.sample``, a tuple/list (first item)
    or a tensor. Conditioning (``encoder_hidden_states``, ``pooled_projections``, ...) goes in
    ``cond`` (``straightflow.sample(..., cond={...})``) or, when it never changes, in
    ``fixed_kwargs``. ``num_train_timesteps=None`` (default) is 1000, except for the models of
    :data:`SIGMA_TIMESTEP_MODELS` (FLUX, FLUX.2, Chroma, Qwen-Image), which take ``sigma`` itself
    (their pipelines divide the scheduler's timestep by 1000): give it explicitly for any other
    such model. Timesteps are computed in at least float32 (a half-precision ``t`` would round
    ``sigma * 1000`` visibly).
    """

    def __init__(self, model: nn.Module, num_train_timesteps: Optional[int] = None, **fixed_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        if num_train_timesteps is None:
            inner = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
            num_train_timesteps = 1 if type(inner).__name__ in SIGMA_TIMESTEP_MODELS else 1000
        self.num_train_timesteps = int(num_train_timesteps)
        self.fixed_kwargs = dict(fixed_kwargs)

    def forward(self, x: Tensor, t: Number, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
            t = t.to(torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        kwargs = {**self.fixed_kwargs, **cond}
        out = self.model(hidden_states=x, timestep=timestep_from_t(t, self.num_train_timesteps), **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return velocity_from_diffusers(out)


def __getattr__(name):  # PEP 562: diffusers is imported only when the scheduler is asked for
    if name == "StraightflowScheduler":
        from .scheduler import StraightflowScheduler

        return StraightflowScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
