"""Observation-conditioned velocity for flow policies: ``v = model(a, t, obs=obs)`` (ReinFlow, MP1)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .embed import SinusoidalTimeEmbedding

__all__ = ["ObsMLP"]


class ObsMLP(nn.Module):
    """Velocity of a flow policy ``v = model(a, t, obs=obs)`` for actions ``a`` (B, action_dim) and
    observations ``obs`` (B, obs_dim): an MLP on ``[a, obs, time embedding]``. The output layer starts at
    zero (a fresh policy predicts ``v = 0``)."""

    def __init__(self, action_dim: int, obs_dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        for name, val in (("action_dim", action_dim), ("obs_dim", obs_dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"ObsMLP: {name} must be an int >= 1, got {val!r}")
        self.config = {"name": "obs_mlp", "action_dim": action_dim, "obs_dim": obs_dim, "hidden": hidden,
                       "depth": depth, "time_dim": time_dim}
        self.action_dim, self.obs_dim = action_dim, obs_dim
        self.sample_shape = (action_dim,)
        self.num_classes = None
        self.time_embed = SinusoidalTimeEmbedding(time_dim, out_dim=hidden)
        layers: List[nn.Module] = [nn.Linear(action_dim + obs_dim + hidden, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, action_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, obs: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Tensor:
        if obs is None:
            raise ValueError("a flow policy needs the observation: model(a, t, obs=obs)")
        b = x.shape[0]
        if obs.shape != (b, self.obs_dim):
            raise ValueError(f"obs must have shape ({b}, {self.obs_dim}), got {tuple(obs.shape)}")
        h = torch.cat([x, obs.to(x.dtype), self.time_embed(t, batch=b).to(x.dtype)], 1)
        return self.out(self.net(h))
