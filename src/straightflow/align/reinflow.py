"""ReinFlow: learnable noise injected into the flow's path, a Markov chain with exact likelihoods.

Zhang et al. 2025, "ReinFlow: Fine-tuning Flow Matching Policy with Online Reinforcement Learning".
A ``K``-step Euler sampler of the velocity ``v_theta`` becomes a stochastic policy by adding noise
whose scale a small *noise network* ``sigma_phi`` predicts (bounded in ``[sigma_min, sigma_max]``
through ``log sigma^2 = lo + (hi - lo) (tanh(u) + 1) / 2``)::

    x_{k+1} = x_k + h v_theta(x_k, t_k, c) + sigma_phi(t_k, c) * eps_k,     eps_k ~ N(0, I),

so the chain has the exact per-step likelihood ``N(x_{k+1}; x_k + h v_theta(x_k, t_k, c),
diag sigma_phi^2)`` and ``log pi(x_{0..K} | c) = sum_k log N(...)`` (``x_0 ~ N(0, I)`` does not depend
on the parameters). ``theta`` and ``phi`` are trained together by a policy gradient; the fine-tuned
velocity is then sampled *without* the injected noise, at the same few steps (ReinFlow's point: it
works at 1-4 steps, where an SDE discretisation of the flow would be poor).

For generation (this module) the policy gradient is the group-relative one of :mod:`.grpo`
(advantages ``(r - mean_G) / std_G`` per prompt, on-policy), plus ``ent_coef`` times the entropy
of the injected noise, plus ``reg`` times the KL to the base model's chain with the same noise,
``sum_k || h (v_theta - v_ref)(x_k, t_k) ||^2 / (2 sigma_phi^2)`` (zero at the base model). For
control with a critic and PPO see :mod:`.policy`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..models.embed import timestep_features
from .base import METHODS, AlignObjective
from .grpo import _repeat_cond, group_advantages
from .sde import gaussian_kl, gaussian_logp

__all__ = ["NoiseNet", "ReinFlow", "reinflow_chain"]


class NoiseNet(nn.Module):
    """``sigma_phi(t, c)``: per-dimension noise scales in ``[min_std, max_std]`` from sinusoidal time
    features (and a conditioning vector ``obs`` of size ``cond_dim`` when > 0). The last layer starts
    at zero, so the initial scale is ``init_std`` (default: the geometric middle of the bounds)."""

    def __init__(self, dim: int, min_std: float = 0.02, max_std: float = 0.3, hidden: int = 64, cond_dim: int = 0,
                 time_dim: int = 16, init_std: Optional[float] = None) -> None:
        super().__init__()
        if not 0 < min_std <= max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got {min_std}, {max_std}")
        self.dim, self.cond_dim, self.time_dim = int(dim), int(cond_dim), int(time_dim)
        self.lo, self.hi = 2 * math.log(min_std), 2 * math.log(max_std)
        init = math.sqrt(min_std * max_std) if init_std is None else float(init_std)
        if not min_std <= init <= max_std:
            raise ValueError(f"init_std {init} is outside [{min_std}, {max_std}]")
        self.config = {"name": "noise_net", "dim": self.dim, "min_std": min_std, "max_std": max_std, "hidden": hidden,
                       "cond_dim": self.cond_dim, "time_dim": self.time_dim, "init_std": init}
        self.net = nn.Sequential(nn.Linear(time_dim + self.cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, self.dim))
        nn.init.zeros_(self.net[-1].weight)
        u0 = (2 * math.log(init) - self.lo) / max(self.hi - self.lo, 1e-12) * 2 - 1
        nn.init.constant_(self.net[-1].bias, math.atanh(max(-0.999, min(0.999, u0))))

    def forward(self, x: Tensor, t: Tensor, obs: Optional[Tensor] = None, **_: Any) -> Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
        feats = [timestep_features(t, self.time_dim).to(x.dtype)]
        if self.cond_dim:
            if obs is None:
                raise ValueError(f"NoiseNet was built with cond_dim={self.cond_dim}: pass obs")
            feats.append(obs.reshape(b, -1).to(x.dtype))
        u = self.net(torch.cat(feats, 1))
        logvar = self.lo + (self.hi - self.lo) * (torch.tanh(u) + 1) / 2
        return torch.exp(0.5 * logvar).reshape(b, *x.shape[1:])


def reinflow_chain(model, x: Tensor, steps: int, cond: Dict[str, Any], generator, velocity=None, noise=None):
    """Sample the ReinFlow chain without grad: ``(states [x_0..x_K], stds [sigma_0..sigma_{K-1}])``.
    ``velocity(x, t, cond)`` and ``noise(x, t, cond)`` default to ``model`` and ``model(part="noise")``."""
    velocity = velocity or (lambda xx, tt, c: model(xx, tt, **c))
    noise = noise or (lambda xx, tt, c: model(xx, tt, part="noise", **c))
    xs, stds = [x], []
    h = 1.0 / steps
    with torch.no_grad():
        for k in range(steps):
            tb = torch.full((x.shape[0],), k * h, dtype=x.dtype, device=x.device)
            v = velocity(x, tb, cond)
            s = noise(x, tb, cond)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + h * v + s * z
            xs.append(x)
            stds.append(s)
    return xs, stds


@METHODS.register("reinflow")
class ReinFlow(AlignObjective):
    """ReinFlow for generation (module docstring). Options: ``group`` (G), ``denoise_steps`` (K, 1-4 is the
    point), ``min_std``/``max_std`` (noise bounds), ``ent_coef``. ``reg``: KL coefficient to the base chain."""

    name = "reinflow"
    default_reg = 0.01

    def __init__(self, model, reward=None, reg=None, path="linear", reference=None, group: int = 8,
                 denoise_steps: int = 4, min_std: float = 0.02, max_std: float = 0.3, ent_coef: float = 0.0,
                 adv_eps: float = 1e-4, noise_hidden: int = 64, init_seed: int = 0) -> None:
        shape = getattr(getattr(model, "get_base_model", lambda: model)(), "sample_shape", None)
        if shape is None:
            raise ValueError("ReinFlow needs a model with .sample_shape (a straightflow model) to size its noise network")
        dim = int(torch.tensor(shape).prod())
        with torch.random.fork_rng(devices=[]):  # the noise network's initialisation is part of the run: seed it
            torch.manual_seed(int(init_seed))
            heads = {"noise": _Shaped(NoiseNet(dim, min_std, max_std, hidden=noise_hidden), tuple(shape))}
        super().__init__(model, reward=reward, reg=reg, path=path, reference=reference, heads=heads)
        self.require(group=(group, 2, " (a group-relative advantage needs two samples per prompt)"),
                     denoise_steps=(denoise_steps, 1, ""))
        self.group, self.denoise_steps = int(group), int(denoise_steps)
        self.min_std, self.max_std, self.ent_coef, self.adv_eps = float(min_std), float(max_std), float(ent_coef), float(adv_eps)

    def settings(self) -> Dict[str, Any]:
        return {"group": self.group, "denoise_steps": self.denoise_steps, "min_std": self.min_std,
                "max_std": self.max_std, "ent_coef": self.ent_coef}

    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        model = self.model if model is None else model
        b, G, K = x1.shape[0], self.group, self.denoise_steps
        cond = _repeat_cond(dict(cond or {}), b, G)
        x = torch.randn((b * G, *x1.shape[1:]), generator=generator, device=x1.device, dtype=x1.dtype)
        xs, _ = reinflow_chain(model, x, K, cond, generator, velocity=lambda xx, tt, c: self.velocity(model, xx, tt, c))
        r = self.score(model, xs[-1])
        adv = group_advantages(r, G, self.adv_eps).to(x1.dtype)
        h = 1.0 / K
        total = x1.new_zeros(())
        for k in range(K):
            tb = torch.full((b * G,), k * h, dtype=x1.dtype, device=x1.device)
            v = self.velocity(model, xs[k], tb, cond)
            std = model(xs[k], tb, part="noise", **cond)
            mean = xs[k] + h * v
            logp = gaussian_logp(xs[k + 1], mean, std)
            term = -torch.exp(logp - logp.detach()) * adv
            if self.ent_coef > 0:
                term = term - self.ent_coef * torch.log(std).reshape(b * G, -1).sum(1)
            if self.reg > 0:
                vr = self.ref_velocity(model, xs[k], tb, cond)
                term = term + self.reg * gaussian_kl(mean, xs[k] + h * vr, std)
            total = total + term.mean()
        return total / K


class _Shaped(nn.Module):
    """A NoiseNet over flattened samples, reshaped to the sample shape; takes the model's ``y`` and ignores it."""

    def __init__(self, net: NoiseNet, shape) -> None:
        super().__init__()
        self.net, self.shape = net, tuple(shape)
        self.config = net.config

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1), t).reshape(x.shape)
