"""Classifier-free guidance as a velocity wrapper (Ho & Salimans 2022).

``v = v_null + w (v_cond - v_null)``, both halves in one batched call of 2B rows, so the NFE
counts 2 per evaluation (``evals_per_call``). ``interval=(a, b)`` applies guidance only for
``a <= t <= b`` (Kynkaanniemi et al. 2024); outside it one conditional call of B rows is made.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


class ClassifierFreeGuidance:
    """Guided velocity for a class-conditional model with ``model.null_class``."""

    def __init__(self, model: Callable, scale: float = 1.0, interval: Optional[Tuple[float, float]] = None) -> None:
        self.model, self.scale, self.interval = model, float(scale), interval
        self.evals_per_call = 2
        self.rows = 0  # rows really computed, summed over calls

    def _null(self) -> int:
        null = getattr(self.model, "null_class", None)
        if null is None:
            raise ValueError("classifier-free guidance needs a class-conditional model with a null class (model.null_class)")
        return int(null)

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, **cond) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels: pass cond={'y': labels}")
        t0 = float(t.reshape(-1)[0])
        if self.interval is not None and not (self.interval[0] <= t0 <= self.interval[1]):
            self.evals_per_call = 1
            self.rows += x.shape[0]
            return self.model(x, t, y=y, **cond)
        self.evals_per_call = 2
        self.rows += 2 * x.shape[0]
        yy = torch.cat([y, torch.full_like(y, self._null())])
        v = self.model(torch.cat([x, x]), torch.cat([t, t]), y=yy, **cond)
        vc, vu = v.chunk(2)
        return vu + self.scale * (vc - vu)
