"""Flow-DPO: direct preference optimisation on the flow-matching loss against a frozen reference.

Liu et al. 2025, "Improving Video Generation with Human Feedback" (sec. 4 and appendix), extending
Diffusion-DPO (Wallace et al. 2024) to velocity models. For a pair (chosen ``x^w``, rejected ``x^l``)
of one prompt, *shared* noise ``x0`` and time ``t``, ``x^*_t = t x^* + (1 - t) x0`` and the target
velocities ``u^* = x^* - x0``::

    L(theta) = - log sigmoid( -beta / 2 * [ (e_theta(x^w) - e_ref(x^w)) - (e_theta(x^l) - e_ref(x^l)) ] ),
    e_m(x^*) = || v_m(x^*_t, t) - u^* ||^2     (mean over elements).

Lowering the model's error on the chosen sample relative to the reference, and raising it on the
rejected one, is rewarded; ``beta`` (``reg``) is the KL coefficient of the underlying objective --
larger keeps the model closer to the reference. The paper derives a time-dependent
``beta_t`` from Diffusion-DPO's and reports that a *constant* ``beta`` works better (the time-dependent
one over-weights high noise levels and reward-hacks); this is the constant-``beta`` form. With
identical chosen and rejected samples the bracket is 0 for every theta: the loss is ``log 2`` and the
gradient exactly zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import METHODS
from .prefs import PreferenceObjective

__all__ = ["FlowDPO", "dpo_loss"]


def dpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """Per-pair Flow-DPO loss from the four per-sample squared errors (B,) each."""
    inside = (err_w - ref_w) - (err_l - ref_l)
    return -F.logsigmoid(-0.5 * beta * inside)


@METHODS.register("dpo", aliases=("flow-dpo", "flow_dpo"))
class FlowDPO(PreferenceObjective):
    """Flow-DPO (module docstring) on packed rows ``[chosen (flattened), rejected (flattened)]``; ``reg = beta``."""

    name = "dpo"
    default_reg = 500.0

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        if not self.reg > 0:
            raise ValueError(f"Flow-DPO's beta (reg) must be > 0, got {self.reg}")

    def make_data(self, base, shape, label, n, seed, out):
        prefs = self.load_or_generate(base, shape, label, n, seed, out)
        xc, xr = prefs.chosen_x(), prefs.rejected_x()
        rows = torch.cat([xc.reshape(xc.shape[0], -1), xr.reshape(xr.shape[0], -1)], 1)
        return self.dataset(rows, None if prefs.y is None else prefs.y[prefs.chosen], base)

    def pair_loss(self, model, xw: Tensor, xl: Tensor, cond, generator) -> Tensor:
        """Per-pair losses for chosen ``xw`` and rejected ``xl`` (B, ...), shared noise and time."""
        b = xw.shape[0]
        x0 = torch.randn(xw.shape, generator=generator, device=xw.device, dtype=xw.dtype)
        t = torch.rand(b, generator=generator, device=xw.device, dtype=xw.dtype)
        xtw, uw = self.path.interpolate(x0, xw, t)
        xtl, ul = self.path.interpolate(x0, xl, t)
        xt, u, tt = torch.cat([xtw, xtl]), torch.cat([uw, ul]), torch.cat([t, t])
        c2 = {k: (torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v) for k, v in cond.items()}
        v = self.velocity(model, xt, tt, c2)
        vr = self.ref_velocity(model, xt, tt, c2)
        err = (v - u).pow(2).reshape(2 * b, -1).mean(1)
        ref = (vr - u).pow(2).reshape(2 * b, -1).mean(1)
        return dpo_loss(err[:b], err[b:], ref[:b], ref[b:], self.reg)

    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        model = self.model if model is None else model
        shape = self.prefs.shape
        d = x1.shape[1] // 2
        xw, xl = x1[:, :d].reshape(-1, *shape), x1[:, d:].reshape(-1, *shape)
        return self.pair_loss(model, xw, xl, dict(cond or {}), generator).mean()
