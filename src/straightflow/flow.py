"""The training objective: a model + a path + a time distribution + a loss + a coupling.

``Flow.loss(x1)`` draws ``x0 ~ N(0, I)``, pairs it with the data by the coupling, draws
``t ~ p(t)``, forms ``x_t = alpha(t) x1 + sigma(t) x0`` and regresses ``model(x_t, t, **cond)``
onto the path's conditional velocity ``alpha'(t) x1 + sigma'(t) x0`` (Lipman et al. 2023;
Liu et al. 2022). Class labels are dropped to the null class with probability ``cond_dropout``
so the model also learns the unconditional velocity needed by classifier-free guidance.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .coupling import Coupling, get_coupling
from .losses import Loss, get_loss
from .paths import AffinePath, get_path
from .time import TimeDistribution, get_time_dist


class Flow:
    """A flow-matching objective around a velocity model ``v = model(x, t, **cond)``."""

    def __init__(
        self,
        model: Callable,
        path: Union[str, Dict, AffinePath] = "linear",
        time_dist: Union[str, Dict, TimeDistribution] = "uniform",
        loss: Union[str, Dict, Loss] = "mse",
        coupling: Union[str, Dict, Coupling] = "independent",
        cond_dropout: float = 0.0,
    ) -> None:
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.model = model
        self.path = get_path(path)
        self.time_dist = get_time_dist(time_dist)
        self.loss_fn = get_loss(loss)
        self.coupling = get_coupling(coupling)
        self.cond_dropout = float(cond_dropout)

    def config(self) -> Dict[str, Any]:
        """JSON-able settings; ``Flow(model, **flow.config())`` rebuilds the objective."""
        return {
            "path": self.path.config(),
            "time_dist": self.time_dist.config(),
            "loss": self.loss_fn.config(),
            "coupling": self.coupling.config(),
            "cond_dropout": self.cond_dropout,
        }

    def __repr__(self) -> str:
        return (f"Flow(path={self.path!r}, time_dist={self.time_dist!r}, loss={self.loss_fn.name}, "
                f"coupling={self.coupling.name}, cond_dropout={self.cond_dropout})")

    def _drop_labels(self, y: Tensor, model: Any, generator: Optional[torch.Generator]) -> Tensor:
        null = getattr(model, "null_class", None)
        if null is None:
            raise ValueError("cond_dropout > 0 needs a class-conditional model with a null class (model.null_class)")
        drop = torch.rand(y.shape[0], generator=generator, device=y.device) < self.cond_dropout
        return torch.where(drop, torch.full_like(y, null), y)

    def prepare(self, x1: Tensor, cond: Optional[Dict[str, Tensor]], x0: Optional[Tensor],
                generator: Optional[torch.Generator], model: Any) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        """The batch every objective starts from: noise ``x0`` (drawn, or the stored pairs'),
        paired with ``x1`` by the coupling (labels follow the pairing), labels dropped to the
        null class with probability ``cond_dropout``. Objectives built on this class (W-CFM,
        MeanFlow, distillation) share it so their random draws come in the same order."""
        cond = dict(cond or {})
        if getattr(self.coupling, "needs_pairs", False) and x0 is None:
            raise ValueError(f"coupling {self.coupling.name!r} needs stored noise: pass x0 (a PairDataset)")
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        elif x0.shape != x1.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != x1 shape {tuple(x1.shape)}")
        x0, x1, idx = self.coupling(x0, x1, generator)
        cond = {k: (v[idx] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == idx.shape[0] else v)
                for k, v in cond.items()}
        if self.cond_dropout > 0 and cond.get("y") is not None:
            base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            cond["y"] = Flow._drop_labels(self, cond["y"], base, generator)
        return x0, x1, cond

    def loss(
        self,
        x1: Tensor,
        cond: Optional[Dict[str, Tensor]] = None,
        x0: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        model: Optional[Callable] = None,
    ) -> Tensor:
        """Scalar flow-matching loss on a minibatch of data ``x1`` (and stored noise ``x0``).

        ``model`` overrides ``self.model`` for this call (the trainer passes its DDP wrapper).
        """
        model = self.model if model is None else model
        x0, x1, cond = self.prepare(x1, cond, x0, generator, model)
        t = self.time_dist.sample(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        xt, ut = self.path.interpolate(x0, x1, t)
        pred = model(xt, t, **cond)
        return self.loss_fn(pred, ut, t).mean()
