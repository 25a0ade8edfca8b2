"""Flow-NRG: reward guidance on noisy samples at inference time, with per-objective weights.

Liu et al. 2025, "Improving Video Generation with Human Feedback" (Flow-NRG): instead of decoding or
denoising before scoring, a reward model that reads the *noisy* sample ``x_t`` directly guides the
ODE, and several rewards are combined with user weights at inference time. Here:

* :class:`NoisyReward` -- a time-conditioned reward model ``r_phi(x_t, t)`` (small MLP for vectors,
  small CNN for images) trained by :func:`train_noisy_reward` to regress a clean reward ``r(x1)`` from
  ``x_t = alpha(t) x1 + sigma(t) x0``; the least-squares optimum is ``E[r(x1) | x_t]``.
* :class:`WeightedRewards` -- ``sum_k w_k r_k`` (the per-objective weights).
* :func:`nrg` -- the guided ODE. Tilting the marginals by ``exp(w . r)`` adds
  ``grad_x log E[exp(w . r(x1)) | x_t] ~ grad_x E[w . r(x1) | x_t]`` to the score, i.e.

      v_guided(x, t) = v(x, t) + scale * c(t) * sum_k w_k grad_x r_k(x, t),

  with ``c(t)`` the path's score-to-velocity coefficient (``(1 - t) / t`` on the linear path; evaluated
  at ``max(t, t_min)``) -- ``scale = 1`` targets ``p(x) exp(w . r(x))`` to first order, exactly for a
  Gaussian target and a linear reward. A reward that only reads clean samples is applied to the
  Tweedie estimate ``x1_hat(x_t)`` instead (``r(x1_hat)``, gradient through the velocity model; then
  every step costs a second NFE for the vector-Jacobian product).

Same calling convention as :func:`~straightflow.control.scaling.best_of_n`/``smc``/``rbf``:
``nrg(model, reward, shape, budget, n)`` spends at most ``budget`` NFE per output (Euler steps).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..models.embed import timestep_features
from ..paths import PathSpec, get_path
from ..solvers import initial_noise
from .rewards import Reward, as_reward
from .scaling import SearchResult, _check_budget, _evals, prepare, register_search_method, time_grid

__all__ = ["NoisyReward", "WeightedRewards", "train_noisy_reward", "nrg", "guidance_coefficient"]


class NoisyReward(nn.Module, Reward):
    """``r_phi(x_t, t) -> (B,)``, a reward model for noisy samples (``noisy = True``).

    Vectors ``(B, D)``: MLP on ``[x, time features]``; images ``(B, C, H, W)``: two 3x3 convolutions,
    global average pooling, then an MLP with the time features. ``r_phi(x)`` alone means ``t = 1``."""

    noisy = True

    def __init__(self, shape: Sequence[int], hidden: int = 64, time_dim: int = 32, name: str = "noisy reward") -> None:
        nn.Module.__init__(self)
        self.shape, self.time_dim, self.name = tuple(int(s) for s in shape), int(time_dim), str(name)
        if len(self.shape) == 3:
            c = self.shape[0]
            self.conv = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
                                      nn.SiLU())
            feat = hidden
        elif len(self.shape) == 1:
            self.conv = None
            feat = self.shape[0]
        else:
            raise ValueError(f"NoisyReward handles vectors (D,) or images (C, H, W), got shape {self.shape}")
        self.mlp = nn.Sequential(nn.Linear(feat + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Union[float, Tensor] = 1.0) -> Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
        h = self.conv(x).mean((2, 3)) if self.conv is not None else x.reshape(b, -1)
        return self.mlp(torch.cat([h, timestep_features(t, self.time_dim).to(x.dtype)], 1))[:, 0]


class WeightedRewards(Reward):
    """``r(x[, t]) = sum_k w_k r_k(x[, t])``: several objectives with user weights (noisy if all are)."""

    def __init__(self, rewards: Sequence[Callable], weights: Optional[Sequence[float]] = None) -> None:
        self.rewards = [r if getattr(r, "noisy", False) else as_reward(r) for r in rewards]
        if not self.rewards:
            raise ValueError("give at least one reward")
        w = [1.0] * len(self.rewards) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.rewards):
            raise ValueError(f"{len(w)} weights for {len(self.rewards)} rewards; give one weight per reward")
        if not all(math.isfinite(v) for v in w):
            raise ValueError(f"weights must be finite, got {w}")
        self.weights = w
        self.noisy = all(getattr(r, "noisy", False) for r in self.rewards)
        self.name = " + ".join(f"{v:g}*{getattr(r, 'name', 'r')}" for v, r in zip(w, self.rewards))

    def __call__(self, x: Tensor, t: Union[float, Tensor, None] = None) -> Tensor:
        out = 0
        for w, r in zip(self.weights, self.rewards):
            out = out + w * (r(x, 1.0 if t is None else t) if getattr(r, "noisy", False) else r(x))
        return out


def train_noisy_reward(reward: Callable[[Tensor], Tensor], x1: Tensor, steps: int = 1000, path: PathSpec = "linear",
                       batch_size: int = 256, lr: float = 2e-3, seed: int = 0, hidden: int = 64,
                       progress: bool = False) -> NoisyReward:
    """Fit ``r_phi(x_t, t) ~ E[r(x1) | x_t]`` on clean samples ``x1`` (data or the base model's samples):
    least squares on ``x_t = alpha(t) x1 + sigma(t) x0``, ``t ~ U(0, 1)``. Deterministic given ``seed``."""
    from tqdm.auto import tqdm

    p = get_path(path)
    with torch.no_grad():
        targets = torch.cat([torch.as_tensor(reward(x1[i:i + 512])).reshape(-1).float() for i in range(0, x1.shape[0], 512)])
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("the reward returned NaN/Inf on the training samples")
    mu, sd = float(targets.mean()), float(targets.std()) + 1e-8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = NoisyReward(tuple(x1.shape[1:]), hidden=hidden, name=f"noisy[{getattr(reward, 'name', 'reward')}]")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    tnorm = (targets - mu) / sd
    net.train()
    for _ in tqdm(range(steps), disable=not progress, desc="noisy reward"):
        idx = torch.randint(0, x1.shape[0], (batch_size,), generator=g)
        xb = x1[idx].float()
        x0 = torch.randn(xb.shape, generator=g)
        t = torch.rand(batch_size, generator=g)
        xt, _ = p.interpolate(x0, xb, t)
        loss = (net(xt, t) - tnorm[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    # fold the normalisation into the last layer so r_phi is in the reward's units
    with torch.no_grad():
        last = net.mlp[-1]
        last.weight.mul_(sd)
        last.bias.mul_(sd).add_(mu)
    return net.eval().requires_grad_(False)


def guidance_coefficient(path, t: float, t_min: float = 0.05) -> float:
    """``c(t)``: the velocity change per unit score change on ``path`` (``(1 - t) / t`` on the linear path),
    evaluated at ``max(t, t_min)``."""
    p = get_path(path)
    tt = torch.tensor([max(float(t), float(t_min))], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    return float(p.score_to_velocity(one, torch.zeros_like(one), tt)[0, 0])


def _tb(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def nrg(model: Callable, reward, shape: Sequence[int], budget: int, n: int = 1, *, steps: Optional[int] = None,
        weights: Optional[Sequence[float]] = None, scale: float = 1.0, t_min: float = 0.05, path: PathSpec = "linear",
        cond: Optional[Dict[str, Any]] = None, seed: Optional[int] = 0, generator: Optional[torch.Generator] = None,
        vp: bool = False, chunk: Optional[int] = None, **ignored: Any):
    """Flow-NRG (module docstring): ``n`` outputs from the reward-guided Euler ODE within ``budget`` NFE each.
    ``vp=True`` guides the VP-converted velocity (:func:`~straightflow.control.scaling.prepare`) instead.

    ``reward``: a :class:`NoisyReward`, a :class:`WeightedRewards`, a list of rewards (with ``weights``), or
    any clean reward (guidance through ``x1_hat``; 2 NFE per step). ``steps`` defaults to the most the
    budget pays for. ``scale``: guidance strength (1 = the first-order tilt by ``exp(w . r)``)."""
    budget, n = _check_budget(budget, n)
    if isinstance(reward, (list, tuple)):
        reward = WeightedRewards(reward, weights)
    elif weights is not None:
        reward = WeightedRewards([reward], weights)
    noisy = bool(getattr(reward, "noisy", False))
    evals_per = int(getattr(model, "evals_per_call", 1))
    if vp and noisy:
        raise ValueError("a noisy reward model reads x_t on the path it was trained on; vp=True (the VP conversion) "
                         "works with clean rewards (guided through x1_hat) only")
    per_step = 1 if noisy else 2
    calls = _evals(model, budget)
    if steps is None:
        steps = calls // per_step
    steps = int(steps)
    if steps < 1 or steps * per_step > calls:
        raise ValueError(f"budget {budget} cannot pay for {steps} guided step(s) at {per_step} NFE each"
                         + ("" if noisy else " (a clean reward needs a VJP through the model: train a NoisyReward "
                                             "with train_noisy_reward for 1 NFE per step)"))
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    model, sp = prepare(model, path, vp)  # with vp: the VP velocity of the same marginals, on an SNR-matched grid
    ts = time_grid(steps, path, vp).tolist()
    x, _ = initial_noise((n, *shape), seed=seed, generator=generator)
    cond = dict(cond or {})
    if cond:
        cond = {k: (v.expand(n, *v.shape[1:]) if torch.is_tensor(v) and v.ndim and v.shape[0] == 1 else v)
                for k, v in cond.items()}
    evals = 0
    for i in range(steps):
        t, h = ts[i], ts[i + 1] - ts[i]
        c = guidance_coefficient(sp, t, t_min) * float(scale)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(not noisy)
            if noisy:
                with torch.no_grad():
                    v = model(x, _tb(t, x), **cond)
                xg = x.detach().requires_grad_(True)
                r = reward(xg, t)
                (grad,) = torch.autograd.grad(r.sum(), xg)
            else:
                v = model(xr, _tb(t, xr), **cond)
                x1 = sp.velocity_to_x1(v, xr, _tb(t, xr))
                r = torch.as_tensor(reward(x1)).reshape(-1)
                (grad,) = torch.autograd.grad(r.sum(), xr)
                v = v.detach()
        evals += per_step * evals_per
        if not bool(torch.isfinite(grad).all()):
            raise ValueError(f"the reward's gradient is NaN/Inf at step {i} (t = {t:.3g}); check the reward")
        x = (x + h * (v + c * grad)).detach()
    with torch.no_grad():
        final = reward(x, 1.0) if noisy else reward(x)
    return SearchResult(x=x, rewards=torch.as_tensor(final).reshape(-1).double(), nfe=evals, budget=budget,
                        info={"method": "nrg", "steps": steps, "scale": float(scale), "noisy": noisy, "vp": bool(vp),
                              "weights": getattr(reward, "weights", None), "total_nfe": evals * n,
                              "reward_calls": steps + 1})


register_search_method("nrg", aliases=("flow-nrg", "flow_nrg"))(nrg)
