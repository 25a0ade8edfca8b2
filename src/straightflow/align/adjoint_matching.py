"""Adjoint Matching: reward fine-tuning as stochastic optimal control with the memoryless schedule.

Domingo-Enrich et al. 2025, "Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with
Memoryless Stochastic Optimal Control". Sampling the flow with the *memoryless* diffusion
``g(t)^2 = 2 eta_t`` (:func:`.sde.memoryless_sigma`; ``2 (1 - t) / t`` on the linear path) makes
``X_0`` and ``X_1`` independent, and then the fine-tuned model whose SDE minimises
``E[ int |u|^2 / 2 dt - lambda r(X_1) ]`` has exactly the tilted marginal
``p*(x) ∝ p_base(x) exp(lambda r(x))``. With the base drift ``b(x, t) = v_base + g^2/2 s_base``
(``= 2 v_base - x / t`` on the linear path) and the control ``u = 2 (v_theta - v_base) / g``, the
*lean adjoint* solves, backwards along a trajectory ``X`` sampled from the current model (no grad),

    d a(t) / dt = - a(t)^T grad_x b(X_t, t),      a(1) = - lambda grad r(X_1),

and the Adjoint Matching loss regresses the control onto ``- g a``::

    L(theta) = E sum_k || 2 / g(t_k) (v_theta(X_k, t_k) - v_base(X_k, t_k)) + g(t_k) a(t_k) ||^2 / K.

Discretisation: Euler-Maruyama on a uniform grid of ``sde_steps`` (the schedule is evaluated with
``1 / alpha`` floored at the first positive grid time, :mod:`.sde`); the lean adjoint by the matching
backward Euler steps ``a_k = a_{k+1} + h * grad_x [a_{k+1} . b(x, t_{k+1})]`` at ``x = X_{k+1}``, one
vector-Jacobian product of the frozen base model per step (the same VJP the ODE adjoint of
:mod:`straightflow.control.adjoint` integrates; here along the SDE trajectory and for ``x`` only).
``reg = 1 / lambda`` (so ``reg = 1`` with ``r = log p(c | x)`` targets ``p_base(x | c)``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .base import METHODS, AlignObjective, step_subset
from .grpo import _repeat_cond, sample_sde_chain
from .sde import diffusion, memoryless_drift

__all__ = ["AdjointMatching", "lean_adjoint"]


def lean_adjoint(base_velocity, xs: List[Tensor], ts: List[float], a1: Tensor, cond: Dict[str, Any],
                 path="linear") -> List[Tensor]:
    """``[a_0, ..., a_K]`` by backward Euler on ``da/dt = - a . grad_x b`` with ``b`` the base model's
    memoryless drift (:func:`.sde.memoryless_drift`, ``2 v - x / t`` on the linear path) at ``(X_{k+1}, t_{k+1})``.
    ``a1`` is ``a_K``."""
    K = len(ts) - 1
    floor = ts[1] if ts[0] <= 0 else 0.0
    a = a1.detach()
    out = [a]
    for k in range(K - 1, -1, -1):
        t1, h = ts[k + 1], ts[k + 1] - ts[k]
        with torch.enable_grad():
            x = xs[k + 1].detach().requires_grad_(True)
            tb = torch.full((x.shape[0],), t1, dtype=x.dtype, device=x.device)
            b = memoryless_drift(x, base_velocity(x, tb, cond), t1, floor, path)
            (vjp,) = torch.autograd.grad(b, x, grad_outputs=a)
        a = (a + h * vjp).detach()
        out.append(a)
    return out[::-1]


@METHODS.register("adjoint_matching", aliases=("adjoint-matching", "am"))
class AdjointMatching(AlignObjective):
    """Adjoint Matching (module docstring). Options: ``group`` (trajectories per prompt), ``sde_steps``
    (K), ``train_steps`` (random subset of the K times per update; None = all). ``reg = 1 / lambda``."""

    name = "adjoint_matching"
    needs_reward_grad = True
    default_reg = 1.0

    def __init__(self, model, reward=None, reg=None, path="linear", reference=None, group: int = 1,
                 sde_steps: int = 20, train_steps: Optional[int] = None) -> None:
        super().__init__(model, reward=reward, reg=reg, path=path, reference=reference)
        self.require(group=(group, 1, ""), sde_steps=(sde_steps, 2, ""))
        if not self.reg > 0:
            raise ValueError(f"Adjoint Matching's reg = 1/lambda must be > 0, got {self.reg}")
        self.group, self.sde_steps = int(group), int(sde_steps)
        self.train_steps = None if train_steps is None else int(train_steps)

    def settings(self) -> Dict[str, Any]:
        return {"group": self.group, "sde_steps": self.sde_steps, "train_steps": self.train_steps}

    def schedule(self):
        ts = self.t_grid(self.sde_steps)
        return ts, diffusion("memoryless", ts, path=self.path)

    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        model = self.model if model is None else model
        b, G = x1.shape[0], self.group
        cond = _repeat_cond(dict(cond or {}), b, G)
        ts, gs = self.schedule()
        K = len(ts) - 1
        x = torch.randn((b * G, *x1.shape[1:]), generator=generator, device=x1.device, dtype=x1.dtype)
        xs = sample_sde_chain(lambda xx, tt, c: self.velocity(model, xx, tt, c), x, ts, gs, cond, generator, self.path)
        xT = xs[-1].detach().requires_grad_(True)
        r = self.score(model, xT, grad=True)
        (gr,) = torch.autograd.grad(r.sum(), xT)
        a1 = -gr / self.reg
        adj = lean_adjoint(lambda xx, tt, c: self._ref_grad(model, xx, tt, c), xs, ts, a1, cond, self.path)
        steps = step_subset(K, self.train_steps, generator)
        total = x1.new_zeros(())
        for k in steps:
            tb = torch.full((b * G,), ts[k], dtype=x1.dtype, device=x1.device)
            v = self.velocity(model, xs[k], tb, cond)
            vr = self.ref_velocity(model, xs[k], tb, cond)
            res = (2.0 / gs[k]) * (v - vr) + gs[k] * adj[k]
            total = total + res.pow(2).reshape(b * G, -1).sum(1).mean()
        return total / len(steps)

    def _ref_grad(self, model, x, t, cond):
        """The base velocity with a graph to ``x`` (for the lean adjoint's VJP); parameters stay frozen."""
        m = self.module(model)
        m.count("reference_grad", x.shape[0])
        if self.reference is not None:
            return self.reference(x, t, **cond)
        with m.policy.disable_adapter():
            return m.policy(x, t, **cond)
