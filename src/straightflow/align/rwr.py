"""Flow-RWR and plain fine-tuning on chosen samples (SFT).

Flow-RWR (Liu et al. 2025, "Improving Video Generation with Human Feedback", sec. 4): the
KL-regularised reward maximisation ``max_p E_p[r] - beta KL(p || p_ref)`` has the solution
``p*(x) ∝ p_ref(x) exp(r(x) / beta)``; reward-weighted regression fits it by weighting the
flow-matching loss of base generations ``x1 ~ p_ref`` by ``exp(r(x1) / beta)``::

    L(theta) = E_{x1, x0, t} [ w(x1) || v_theta(x_t, t) - (x1 - x0) ||^2 ],
    w(x1) = exp(r(x1) / beta) / mean_j exp(r(x1_j) / beta),     x_t = t x1 + (1 - t) x0,

(the paper writes ``exp(r)``: ``beta = 1``; the weights are normalised by their mean over the whole
generated set once, so the loss keeps its scale and is an unbiased minibatch estimate of the same
objective). ``reg`` is ``beta``. The squared error is the mean over elements (as Flow-DPO's).

SFT ("supervised fine-tuning" in the paper's comparison): the same loss with ``w = 1`` on the
*chosen* sample of every preference pair; ``reg`` is the weight of an optional velocity penalty
``reg * || v_theta(x_t, t) - v_ref(x_t, t) ||^2`` keeping it near the base model (default 0).
"""
from __future__ import annotations


import torch
from torch import Tensor

from .base import METHODS
from .prefs import PreferenceObjective

__all__ = ["FlowRWR", "FlowSFT", "rwr_weights"]


def rwr_weights(r: Tensor, beta: float) -> Tensor:
    """``exp(r / beta)`` normalised to mean 1 (computed stably)."""
    if not beta > 0:
        raise ValueError(f"Flow-RWR temperature beta (reg) must be > 0, got {beta}")
    z = (r.double() - r.double().max()) / beta
    w = torch.exp(z)
    return (w / w.mean()).to(r.dtype)


class _WeightedFM(PreferenceObjective):
    """Weighted flow matching on packed rows ``[x1 (flattened), weight]``."""

    def _fm(self, model, x1: Tensor, w: Tensor, cond, generator) -> Tensor:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        xt, ut = self.path.interpolate(x0, x1, t)
        v = self.velocity(model, xt, t, cond)
        err = (v - ut).pow(2).reshape(x1.shape[0], -1).mean(1)
        loss = (w * err).mean()
        if self.penalty > 0:
            vr = self.ref_velocity(model, xt, t, cond)
            loss = loss + self.penalty * (v - vr).pow(2).reshape(x1.shape[0], -1).mean(1).mean()
        return loss

    penalty = 0.0

    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        model = self.model if model is None else model
        shape = self.prefs.shape
        x, w = x1[:, :-1].reshape(x1.shape[0], *shape), x1[:, -1]
        return self._fm(model, x, w, dict(cond or {}), generator)


@METHODS.register("rwr", aliases=("flow-rwr", "flow_rwr"))
class FlowRWR(_WeightedFM):
    """Flow-RWR (module docstring): all generated samples, weights ``exp(r / beta)``; ``reg = beta``."""

    name = "rwr"
    default_reg = 1.0

    def make_data(self, base, shape, label, n, seed, out):
        prefs = self.load_or_generate(base, shape, label, n, seed, out)
        r = prefs.reward
        if r is None:
            if self.reward is None:
                raise ValueError("Flow-RWR weights samples by their reward: the preference samples file has no "
                                 "'reward' tensor, so pass reward= as well")
            r = torch.cat([self.score(self.model, prefs.x[i:i + 512], where="scoring preference samples")
                           for i in range(0, prefs.x.shape[0], 512)]).float()
        w = rwr_weights(r.float(), self.reg)
        rows = torch.cat([prefs.x.reshape(prefs.x.shape[0], -1), w[:, None]], 1)
        return self.dataset(rows, prefs.y, base)


@METHODS.register("sft", aliases=("finetune", "chosen"))
class FlowSFT(_WeightedFM):
    """Plain flow-matching fine-tuning on the chosen samples (module docstring); ``reg`` = velocity penalty."""

    name = "sft"
    default_reg = 0.0

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.penalty = self.reg

    def make_data(self, base, shape, label, n, seed, out):
        prefs = self.load_or_generate(base, shape, label, n, seed, out)
        xc = prefs.chosen_x()
        rows = torch.cat([xc.reshape(xc.shape[0], -1), torch.ones(xc.shape[0], 1)], 1)
        return self.dataset(rows, None if prefs.y is None else prefs.y[prefs.chosen], base)
