"""Stochastic similarity filter (Kodaira et al. 2023, "StreamDiffusion", SSF).

The cosine similarity ``s = <x, x_ref> / (|x| |x_ref|)`` of the incoming frame to the last frame
that was *processed* gives the skip probability ``p = max(0, (s - eta) / (1 - eta))``
(``eta`` the threshold; ``p = 0`` for ``eta >= 1``), the paper's ``1 - (1 - s)/(1 - eta)``.
A skipped frame is not denoised: the caller re-emits the last output. After ``max_skip``
consecutive skips the next frame is always processed, so a static scene still refreshes.
Draws come from a seeded generator, so a run is reproducible.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["SimilarityFilter", "skip_probability", "cosine_similarity"]


def cosine_similarity(a: Tensor, b: Tensor, eps: float = 1e-6) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(torch.dot(a, b) / (a.norm().clamp_min(eps) * b.norm().clamp_min(eps)))


def skip_probability(similarity: float, threshold: float) -> float:
    """``max(0, (s - eta) / (1 - eta))``, 0 when ``eta >= 1``."""
    if threshold >= 1.0:
        return 0.0
    return max(0.0, (float(similarity) - threshold) / (1.0 - threshold))


class SimilarityFilter:
    """``f(frame) -> bool``: True to process the frame, False to skip it (re-emit the last output)."""

    def __init__(self, threshold: float = 0.98, max_skip: int = 10, seed: int = 0) -> None:
        if not -1.0 <= float(threshold) <= 1.0:
            raise ValueError(f"similarity threshold must be in [-1, 1], got {threshold}")
        if not isinstance(max_skip, int) or isinstance(max_skip, bool) or max_skip < 0:
            raise ValueError(f"max_skip must be an integer >= 0, got {max_skip!r}")
        self.threshold = float(threshold)
        self.max_skip = max_skip
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._ref: Optional[Tensor] = None
        self.run = 0          # consecutive skips so far
        self.processed = 0
        self.skipped = 0
        self.forced = 0       # frames processed only because of max_skip
        self.last_similarity: Optional[float] = None
        self.last_probability = 0.0

    def __call__(self, frame: Tensor) -> bool:
        x = torch.as_tensor(frame).detach()
        if self._ref is None or self._ref.shape != x.shape:
            return self._accept(x)
        s = cosine_similarity(x, self._ref)
        p = skip_probability(s, self.threshold)
        self.last_similarity, self.last_probability = s, p
        u = self._rng.random()  # drawn every frame, so the stream of draws does not depend on the rule below
        if u < p:
            if self.run >= self.max_skip:
                self.forced += 1
                return self._accept(x)
            self.run += 1
            self.skipped += 1
            return False
        return self._accept(x)

    def _accept(self, x: Tensor) -> bool:
        self._ref = x.clone()
        self.run = 0
        self.processed += 1
        return True

    @property
    def skip_rate(self) -> float:
        total = self.processed + self.skipped
        return self.skipped / total if total else 0.0
