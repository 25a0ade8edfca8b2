"""Flow-GRPO: group-relative policy gradient on the SDE form of the flow.

Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL". The ODE sampler is
replaced by the marginal-preserving SDE with Flow-GRPO's diffusion ``g(t) = a sqrt((1 - t) / t)``
(:func:`.sde.grpo_sigma`; the paper's ``sigma_s = a sqrt(s / (1 - s))`` in noise level ``s = 1 - t``),
whose Euler-Maruyama steps are Gaussian with exact log-densities
``log pi_theta(x_{k+1} | x_k) = log N(x_{k+1}; mean_theta(x_k), g(t_k)^2 h)``. For every prompt ``c``
of the batch, a group of ``G`` trajectories is sampled from the *current* model, each final sample is
scored, and the group-relative advantage ``A_i = (r_i - mean_G r) / (std_G r + eps)`` weights the
clipped likelihood ratio of every step::

    L(theta) = - 1/(G K) sum_i sum_k min( rho_ik A_i, clip(rho_ik, 1 - eps_c, 1 + eps_c) A_i )
               + reg * 1/(G K) sum_i sum_k KL( pi_theta(. | x_ik) || pi_ref(. | x_ik) ),
    rho_ik = pi_theta(x_{i,k+1} | x_ik) / pi_old(x_{i,k+1} | x_ik),
    KL = || mean_theta(x_ik) - mean_ref(x_ik) ||^2 / (2 g(t_k)^2 h)     (exact: same covariance).

Here each sampled group gets one optimizer step (the trainer's step), so ``pi_old = pi_theta`` at the
time of the update: ``rho = 1`` with the gradient of ``log pi_theta`` (REINFORCE with a group
baseline) and the clip inactive -- the on-policy case of the paper's objective. The KL term is zero at
the base model (``theta = theta_ref``). Log-densities and the KL are summed over dimensions (exact),
where the authors' code averages them; that only rescales ``reg``. ``train_steps`` (default: all)
picks a random subset of the ``K`` steps per update, as the paper's ablation allows.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .base import METHODS, AlignObjective, step_subset
from .sde import diffusion, gaussian_kl, gaussian_logp, sde_mean

__all__ = ["FlowGRPO", "group_advantages", "sample_sde_chain"]


def group_advantages(r: Tensor, group: int, eps: float = 1e-4) -> Tensor:
    """``(r - mean) / (std + eps)`` within consecutive groups of ``group`` rewards."""
    rg = r.reshape(-1, group)
    return ((rg - rg.mean(1, keepdim=True)) / (rg.std(1, unbiased=False, keepdim=True) + eps)).reshape(-1)


@torch.no_grad()
def sample_sde_chain(velocity, x: Tensor, ts: List[float], gs: List[float], cond, generator, path="linear") -> List[Tensor]:
    """States ``[x_0, ..., x_K]`` of the Euler-Maruyama chain (noise from ``generator``)."""
    xs = [x]
    for k in range(len(ts) - 1):
        t, h = ts[k], ts[k + 1] - ts[k]
        tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        v = velocity(x, tb, cond)
        mean = sde_mean(x, v, t, h, gs[k], path)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + gs[k] * (h ** 0.5) * z
        xs.append(x)
    return xs


def _repeat_cond(cond: Dict[str, Any], b: int, g: int) -> Dict[str, Any]:
    return {k: (v.repeat_interleave(g, 0) if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v)
            for k, v in cond.items()}


@METHODS.register("grpo", aliases=("flow-grpo", "flow_grpo"))
class FlowGRPO(AlignObjective):
    """Flow-GRPO (module docstring). Options: ``group`` (G, samples per prompt), ``sde_steps`` (K),
    ``noise_level`` (a), ``clip`` (eps_c), ``train_steps`` (steps per update; None = all K). ``reg``:
    KL coefficient. The trainer's batch size is the number of prompts per update."""

    name = "grpo"
    default_reg = 0.01

    def __init__(self, model, reward=None, reg=None, path="linear", reference=None, group: int = 8,
                 sde_steps: int = 10, noise_level: float = 0.7, clip: float = 0.2,
                 train_steps: Optional[int] = None, adv_eps: float = 1e-4) -> None:
        super().__init__(model, reward=reward, reg=reg, path=path, reference=reference)
        self.require(group=(group, 2, " (a group-relative advantage needs two samples per prompt)"),
                     sde_steps=(sde_steps, 1, ""))
        self.group, self.sde_steps, self.noise_level = int(group), int(sde_steps), float(noise_level)
        self.clip, self.adv_eps = float(clip), float(adv_eps)
        self.train_steps = None if train_steps is None else int(train_steps)

    def settings(self) -> Dict[str, Any]:
        return {"group": self.group, "sde_steps": self.sde_steps, "noise_level": self.noise_level, "clip": self.clip,
                "train_steps": self.train_steps}

    def schedule(self):
        ts = self.t_grid(self.sde_steps)
        return ts, diffusion("grpo", ts, self.noise_level, self.path)

    def surrogate(self, logp: Tensor, adv: Tensor, old_logp: Optional[Tensor] = None) -> Tensor:
        """PPO-clip surrogate per row (to minimise); ``old_logp`` defaults to ``logp.detach()`` (on-policy)."""
        old = logp.detach() if old_logp is None else old_logp
        ratio = torch.exp(logp - old)
        return -torch.minimum(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv)

    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        model = self.model if model is None else model
        b, G = x1.shape[0], self.group
        cond = _repeat_cond(dict(cond or {}), b, G)
        shape = x1.shape[1:]
        ts, gs = self.schedule()
        x = torch.randn((b * G, *shape), generator=generator, device=x1.device, dtype=x1.dtype)
        xs = sample_sde_chain(lambda xx, tt, c: self.velocity(model, xx, tt, c), x, ts, gs, cond, generator, self.path)
        r = self.score(model, xs[-1])
        adv = group_advantages(r, G, self.adv_eps).to(x1.dtype)
        K = len(ts) - 1
        steps = step_subset(K, self.train_steps, generator)
        total = x1.new_zeros(())
        for k in steps:
            t, h = ts[k], ts[k + 1] - ts[k]
            tb = torch.full((b * G,), t, dtype=x1.dtype, device=x1.device)
            std = gs[k] * h ** 0.5
            mean = sde_mean(xs[k], self.velocity(model, xs[k], tb, cond), t, h, gs[k], self.path)
            logp = gaussian_logp(xs[k + 1], mean, std)
            term = self.surrogate(logp, adv)
            if self.reg > 0:
                mean_ref = sde_mean(xs[k], self.ref_velocity(model, xs[k], tb, cond), t, h, gs[k], self.path)
                term = term + self.reg * gaussian_kl(mean, mean_ref, std)
            total = total + term.mean()
        return total / len(steps)
