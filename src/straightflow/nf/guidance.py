"""Classifier-free guidance for one autoregressive affine step.

Each step of a TarFlow block samples ``x_i = mu_i + exp(alpha_i) z_i``, i.e. the conditional
``p(x_i | x_<i, y) = N(mu_i, exp(2 alpha_i))``. With the conditional ``(alpha_c, mu_c)`` and the
unconditional (null-class) ``(alpha_u, mu_u)`` and a CFG ``scale`` (``w = scale - 1``; scale 1 is the
conditional model, unguided):

- ``"tarflow"`` (TarFlow, Zhai et al. 2024, Sec. 2.4; ml-tarflow ``guide_what='ab'``): extrapolate both
  parameters, ``alpha = alpha_c + w (alpha_c - alpha_u)``, ``mu = mu_c + w (mu_c - mu_u)``.
- ``"starflow"`` (STARFlow, Gu et al. 2025): the Gaussian proportional to
  ``p_c^(1+w) / p_u^w``, with the ratio of variances capped at 1 so it stays a Gaussian:
  ``s = min(sigma_c / sigma_u, 1)^2``, ``sigma = sigma_c / sqrt(1 + w - w s)``,
  ``mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["GUIDANCE_KINDS", "guide"]

GUIDANCE_KINDS = ("tarflow", "starflow")


def guide(alpha_c: Tensor, mu_c: Tensor, alpha_u: Tensor, mu_u: Tensor, scale: float,
          kind: str = "tarflow") -> Tuple[Tensor, Tensor]:
    """Guided ``(alpha, mu)`` of one AR step (see the module docstring); ``scale == 1`` returns the conditional."""
    w = float(scale) - 1.0
    if kind == "tarflow":
        return alpha_c + w * (alpha_c - alpha_u), mu_c + w * (mu_c - mu_u)
    if kind == "starflow":
        s = torch.exp(2 * (alpha_c - alpha_u)).clamp(max=1.0)
        d = 1 + w - w * s
        return alpha_c - 0.5 * torch.log(d), ((1 + w) * mu_c - w * s * mu_u) / d
    raise ValueError(f"unknown guidance kind {kind!r}; valid: {', '.join(GUIDANCE_KINDS)}")
