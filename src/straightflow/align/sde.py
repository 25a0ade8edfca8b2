"""SDE forms of a flow with exact per-step Gaussian likelihoods (the online RL methods' sampler).

A velocity ``v`` trained on an affine path ``x_t = alpha(t) x1 + sigma(t) x0`` (t = 0 noise, t = 1
data) has the same marginals as every SDE

    dX = [v(X, t) + g(t)^2 / 2 * s(X, t)] dt + g(t) dW,     s = score from v through the path,

(:mod:`straightflow.solvers.sde`). Its Euler-Maruyama step from ``t`` to ``t + h`` is a Gaussian

    X_{t+h} | X_t = x  ~  N(mean, std^2 I),   mean = x + h (v + g^2/2 s),   std = g(t) sqrt(h),

so a trajectory of the discrete chain has an exact log-likelihood, the sum of these Gaussian
log-densities (:func:`gaussian_logp`), differentiable in the model's parameters through ``mean``.
That is what the policy-gradient methods (Flow-GRPO, ReinFlow) optimise; the fine-tuned model is
then sampled with any ODE solver.

**Diffusion schedules, translated to this library's time once, here.**

* Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", eq. 9)
  writes time as the noise level ``s`` (``s = 1`` noise, ``s = 0`` data; our ``s = 1 - t``) and
  uses ``sigma_s = a sqrt(s / (1 - s))``. In our time: ``g(t) = a sqrt((1 - t) / t)``
  (:func:`grpo_sigma`). It is infinite at ``t = 0``; like the authors (who replace ``s = 1`` by the
  next grid level in the denominator) we evaluate the denominator at ``max(t, t_floor)`` with
  ``t_floor`` the first positive grid time.
* Adjoint Matching (Domingo-Enrich et al. 2025) needs the *memoryless* schedule
  ``g(t)^2 = 2 eta_t``, ``eta_t = sigma(t) (alpha'(t) sigma(t) / alpha(t) - sigma'(t))``
  (:func:`memoryless_sigma`); on the linear path ``g(t)^2 = 2 (1 - t) / t``, and the drift is
  ``v + g^2/2 s = 2 v - x / t``. Same floor at ``t = 0``.

Both functions take times in this library's convention; :mod:`tests.test_align` checks the
Flow-GRPO step written in the authors' convention against :func:`sde_mean` here.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from ..paths import AffinePath, get_path

__all__ = ["grpo_sigma", "memoryless_sigma", "memoryless_drift", "sde_mean", "gaussian_logp", "gaussian_kl", "diffusion"]

Number = Union[float, Tensor]


def _path(path) -> AffinePath:
    return path if isinstance(path, AffinePath) else get_path(path)


def _f64(t: Number) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def grpo_sigma(t: Number, a: float = 0.7, t_floor: float = 0.0, path="linear") -> float:
    """Flow-GRPO's diffusion in this library's time: ``g(t) = a sqrt(sigma(t) / alpha(t))``, which on
    the linear path is ``a sqrt((1 - t) / t)`` (the authors' ``a sqrt(s / (1 - s))`` with ``s = 1 - t``);
    ``alpha`` is evaluated at ``max(t, t_floor)``."""
    p = _path(path)
    tt = _f64(t)
    den = float(p.alpha(torch.clamp(tt, min=float(t_floor))))
    if den <= 0:
        raise ValueError(f"grpo_sigma: alpha(t) = 0 at t = {float(tt)}; pass t_floor > 0 (the first positive grid time)")
    return float(a) * math.sqrt(max(float(p.sigma(tt)), 0.0) / den)


def memoryless_sigma(t: Number, t_floor: float = 0.0, path="linear") -> float:
    """The memoryless diffusion ``g(t) = sqrt(2 eta_t)``, ``eta_t = sigma (alpha' sigma / alpha - sigma')``
    (Adjoint Matching); ``sqrt(2 (1 - t) / t)`` on the linear path. ``1 / alpha`` is evaluated at
    ``max(t, t_floor)``."""
    p = _path(path)
    tt = _f64(t)
    tf = torch.clamp(tt, min=float(t_floor))
    a = float(p.alpha(tf))
    if a <= 0:
        raise ValueError(f"memoryless_sigma: alpha(t) = 0 at t = {float(tt)}; pass t_floor > 0")
    s, da, ds = float(p.sigma(tt)), float(p.d_alpha(tt)), float(p.d_sigma(tt))
    eta = s * (da * s / a - ds)
    return math.sqrt(max(2.0 * eta, 0.0))


def diffusion(kind: str, ts: Sequence[float], a: float = 0.7, path="linear") -> list:
    """``g`` at every grid time but the last (``kind``: ``"grpo"`` or ``"memoryless"``), with the floor
    ``t_floor = ts[1]`` (the first positive grid time)."""
    ts = [float(t) for t in ts]
    floor = ts[1] if len(ts) > 1 and ts[0] <= 0 else 0.0
    if kind == "grpo":
        return [grpo_sigma(t, a, floor, path) for t in ts[:-1]]
    if kind == "memoryless":
        return [memoryless_sigma(t, floor, path) for t in ts[:-1]]
    raise ValueError(f"unknown diffusion schedule {kind!r}; valid: grpo, memoryless")


def sde_mean(x: Tensor, v: Tensor, t: float, h: float, g: float, path="linear") -> Tensor:
    """Mean of the Euler-Maruyama step ``x + h (v + g^2 / 2 * s)``, ``s`` the score read off ``v``
    through the path (differentiable in ``v``). ``g = 0`` is the Euler ODE step."""
    if g == 0:
        return x + h * v
    p = _path(path)
    tb = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    return x + h * (v + 0.5 * g * g * p.velocity_to_score(v, x, tb))


def memoryless_drift(x: Tensor, v: Tensor, t: float, t_floor: float = 0.0, path="linear") -> Tensor:
    """The memoryless SDE's drift ``b = v + eta_t s = v - (alpha' sigma / alpha - sigma') x0_hat`` (``2 v - x / t``
    on the linear path), finite at ``t = 1``; ``1 / alpha`` floored at ``t_floor`` like :func:`memoryless_sigma`."""
    p = _path(path)
    tt = _f64(t)
    a = float(p.alpha(torch.clamp(tt, min=float(t_floor))))
    c = float(p.d_alpha(tt)) * float(p.sigma(tt)) / a - float(p.d_sigma(tt))
    tb = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    return v - c * p.velocity_to_x0(v, x, tb)


def gaussian_logp(x: Tensor, mean: Tensor, std: Union[float, Tensor]) -> Tensor:
    """``log N(x; mean, std^2 I)`` summed over all but the batch dimension -> (B,). ``std`` a float or a
    tensor broadcastable to ``x`` (per-dimension standard deviations)."""
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    z = (x - mean) / std_t
    per = -0.5 * z * z - torch.log(std_t) - 0.5 * math.log(2 * math.pi)
    per = per.expand_as(x) if per.shape != x.shape else per
    return per.reshape(x.shape[0], -1).sum(1)


def gaussian_kl(mean_a: Tensor, mean_b: Tensor, std: Union[float, Tensor]) -> Tensor:
    """``KL(N(mean_a, std^2) || N(mean_b, std^2)) = |mean_a - mean_b|^2 / (2 std^2)`` summed per row -> (B,)."""
    std_t = torch.as_tensor(std, dtype=mean_a.dtype, device=mean_a.device)
    d = (mean_a - mean_b) / std_t
    return 0.5 * (d * d).reshape(mean_a.shape[0], -1).sum(1)
