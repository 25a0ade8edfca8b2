"""DRaFT: direct reward back-propagation through the sampler, with truncated gradients.

Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards" (DRaFT-K), here
on a flow's Euler sampler: from noise ``x_0``, ``K = sample_steps`` Euler steps
``x_{k+1} = x_k + h v_theta(x_k, t_k)`` produce ``x_K``, and

    L(theta) = - mean r(x_K) + reg * mean_k || v_theta(x_k, t_k) - v_ref(x_k, t_k) ||^2,

with the gradient kept only through the last ``truncate`` steps (the earlier ones run without a graph:
DRaFT-K; ``truncate = 1`` is DRaFT-1). ``truncate = 0`` back-propagates through *all* steps with the
adjoint method of :mod:`straightflow.control.adjoint` (constant memory). The penalty (``reg``; the mean
over elements, on the graded steps) is the simple baseline's regularisation to the base model: DRaFT
itself has none and reward-hacks without early stopping.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from .base import METHODS, AlignObjective
from .grpo import _repeat_cond

__all__ = ["DRaFT"]


@METHODS.register("draft", aliases=("draft-k", "reward-backprop"))
class DRaFT(AlignObjective):
    """DRaFT-K (module docstring). Options: ``sample_steps`` (Euler steps), ``truncate`` (graded last steps;
    0 = all, by the adjoint), ``group`` (samples per prompt). ``reg``: velocity penalty weight."""

    name = "draft"
    needs_reward_grad = True
    default_reg = 0.0

    def __init__(self, model, reward=None, reg=None, path="linear", reference=None, sample_steps: int = 4,
                 truncate: int = 1, group: int = 1) -> None:
        super().__init__(model, reward=reward, reg=reg, path=path, reference=reference)
        self.require(sample_steps=(sample_steps, 1, ""), group=(group, 1, ""), truncate=(truncate, 0, " (0 = all steps)"))
        if truncate > sample_steps:
            raise ValueError(f"draft: truncate must be <= sample_steps = {sample_steps}, got {truncate}")
        self.sample_steps, self.truncate, self.group = int(sample_steps), int(truncate), int(group)

    def settings(self) -> Dict[str, Any]:
        return {"sample_steps": self.sample_steps, "truncate": self.truncate, "group": self.group}

    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        model = self.model if model is None else model
        b, G, K = x1.shape[0], self.group, self.sample_steps
        cond = _repeat_cond(dict(cond or {}), b, G)
        x = torch.randn((b * G, *x1.shape[1:]), generator=generator, device=x1.device, dtype=x1.dtype)
        h = 1.0 / K
        pen = x1.new_zeros(())
        if self.truncate == 0:
            from ..control.adjoint import odeint_adjoint

            m = self.module(model)
            m.count("grad_forward", x.shape[0] * K)
            xK = odeint_adjoint(m.policy, x, K, "euler", cond=cond,
                                params=[p for p in m.parameters() if p.requires_grad])
        else:
            first = K - self.truncate
            with torch.no_grad():
                for k in range(first):
                    tb = torch.full((x.shape[0],), k * h, dtype=x.dtype, device=x.device)
                    x = x + h * self.velocity(model, x, tb, cond)
            for k in range(first, K):
                tb = torch.full((x.shape[0],), k * h, dtype=x.dtype, device=x.device)
                v = self.velocity(model, x, tb, cond)
                if self.reg > 0:
                    vr = self.ref_velocity(model, x.detach(), tb, cond)
                    pen = pen + (v - vr).pow(2).reshape(x.shape[0], -1).mean(1).mean() / self.truncate
                x = x + h * v
            xK = x
        r = self.score(model, xK, grad=True)
        return -r.mean() + self.reg * pen
