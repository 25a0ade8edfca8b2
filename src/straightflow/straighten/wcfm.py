"""Weighted Conditional Flow Matching (Calvo-Ordoñez et al. 2025, "Weighted Conditional Flow Matching").

W-CFM keeps the independent coupling ``(x0, x1) ~ p0 x p1`` of plain CFM and weights every
training pair with a Gibbs kernel of the transport cost::

    L(theta) = E_{t, x0, x1} [ w_eps(x0, x1) * || v_theta(x_t, t) - u_t(x0, x1) ||^2 ],
    w_eps(x0, x1) = exp(-c(x0, x1) / eps),   c(x0, x1) = ||x0 - x1||^2 / d.

The weighted product measure ``w_eps dp0 dp1`` is the entropic-OT plan up to a tilt of its
marginals (the Sinkhorn potentials are dropped), so W-CFM approximates entropic OT-CFM without
solving a minibatch OT problem. ``eps -> inf`` gives ``w = 1``: plain (I-)CFM exactly.

Cost normalisation: the squared distance is divided by the data dimension ``d`` (``cost="mean"``)
so one ``eps`` means the same for 2-D toys and images; ``cost="sum"`` uses the raw squared
distance (then ``eps_sum = d * eps_mean``). ``normalize="batch"`` divides the weighted loss by the
batch mean of the weights (a self-normalised estimate of the same minimiser whose scale does not
depend on ``eps``); ``normalize="none"`` is the paper's plain weighted average.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor

from ..coupling import Coupling
from ..flow import Flow
from ..losses import Loss
from ..paths import AffinePath
from ..time import TimeDistribution

__all__ = ["WeightedCFM", "gibbs_weights"]

_COSTS = ("mean", "sum")
_NORMALIZE = ("batch", "none")


def gibbs_weights(x0: Tensor, x1: Tensor, epsilon: float, cost: str = "mean") -> Tensor:
    """``w = exp(-c(x0, x1) / eps)`` per row, ``c = ||x0 - x1||^2`` (``/ d`` for ``cost="mean"``).

    ``epsilon = inf`` returns exactly ones.
    """
    if cost not in _COSTS:
        raise ValueError(f"unknown W-CFM cost {cost!r}; valid: {', '.join(_COSTS)}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} != x1 shape {tuple(x1.shape)}")
    diff = (x0 - x1).reshape(x0.shape[0], -1)
    c = diff.pow(2).sum(dim=1)
    if cost == "mean":
        c = c / diff.shape[1]
    if math.isinf(epsilon):
        return torch.ones_like(c)
    return torch.exp(-c / epsilon)


class WeightedCFM(Flow):
    """W-CFM objective: ``mean_i w_i * loss_i`` with Gibbs weights ``w_i = exp(-c(x0_i, x1_i) / eps)``.

    Works with :func:`straightflow.train` like :class:`~straightflow.flow.Flow`; ``WeightedCFM(model,
    **obj.config())`` rebuilds it. The coupling defaults to ``independent`` (the point of the
    method); stored pairs (a :class:`~straightflow.coupling.PairDataset`, e.g. a non-Gaussian
    source) are weighted the same way. The weights are constants (no gradient flows through them).
    """

    def __init__(
        self,
        model: Callable,
        epsilon: float = 1.0,
        path: Union[str, Dict, AffinePath] = "linear",
        time_dist: Union[str, Dict, TimeDistribution] = "uniform",
        loss: Union[str, Dict, Loss] = "mse",
        coupling: Union[str, Dict, Coupling] = "independent",
        cond_dropout: float = 0.0,
        cost: str = "mean",
        normalize: str = "batch",
        objective: str = "wcfm",
    ) -> None:
        if objective != "wcfm":
            raise ValueError(f"WeightedCFM config has objective {objective!r}, expected 'wcfm'")
        epsilon = float(epsilon)
        if not (epsilon > 0):  # also rejects NaN
            raise ValueError(f"W-CFM epsilon must be > 0 (inf = plain CFM), got {epsilon}")
        if cost not in _COSTS:
            raise ValueError(f"unknown W-CFM cost {cost!r}; valid: {', '.join(_COSTS)}")
        if normalize not in _NORMALIZE:
            raise ValueError(f"unknown W-CFM normalize {normalize!r}; valid: {', '.join(_NORMALIZE)}")
        super().__init__(model, path=path, time_dist=time_dist, loss=loss, coupling=coupling, cond_dropout=cond_dropout)
        self.epsilon, self.cost, self.normalize = epsilon, cost, normalize

    def config(self) -> Dict[str, Any]:
        """JSON-able settings; ``WeightedCFM(model, **obj.config())`` rebuilds the objective."""
        eps: Any = "inf" if math.isinf(self.epsilon) else self.epsilon  # JSON has no Infinity
        return {**super().config(), "objective": "wcfm", "epsilon": eps, "cost": self.cost, "normalize": self.normalize}

    def __repr__(self) -> str:
        return f"WeightedCFM(epsilon={self.epsilon}, cost={self.cost}, normalize={self.normalize}, {super().__repr__()})"

    def loss(
        self,
        x1: Tensor,
        cond: Optional[Dict[str, Tensor]] = None,
        x0: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        model: Optional[Callable] = None,
    ) -> Tensor:
        """Scalar W-CFM loss on a minibatch (same draws as :meth:`Flow.loss`, per-pair weighted)."""
        model = self.model if model is None else model
        x0, x1, cond = self.prepare(x1, cond, x0, generator, model)
        t = self.time_dist.sample(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        xt, ut = self.path.interpolate(x0, x1, t)
        pred = model(xt, t, **cond)
        per = self.loss_fn(pred, ut, t)
        with torch.no_grad():
            w = self.weights(x0, x1).to(per.dtype)
        return (w * per).mean()

    def weights(self, x0: Tensor, x1: Tensor) -> Tensor:
        """The per-pair weights used by :meth:`loss` (batch-normalised to mean 1 if ``normalize="batch"``).

        Batch normalisation is computed in log space (``B * softmax(-c / eps)``), so a small
        ``eps`` cannot underflow every weight to zero.
        """
        if math.isinf(self.epsilon) or self.normalize == "none":
            return gibbs_weights(x0, x1, self.epsilon, self.cost)
        diff = (x0 - x1).reshape(x0.shape[0], -1)
        c = diff.pow(2).sum(dim=1)
        if self.cost == "mean":
            c = c / diff.shape[1]
        return torch.softmax(-c / self.epsilon, dim=0) * c.shape[0]
