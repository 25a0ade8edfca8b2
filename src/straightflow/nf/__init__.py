"""Normalizing flows with exact likelihoods: TarFlow, STARFlow and GS-Jacobi sampling.

- :class:`TarFlow` (:mod:`.tarflow`): causal-transformer autoregressive affine blocks over patches,
  exact log-likelihood, bits/dim, noise-augmented maximum likelihood, the score-based denoising step.
- :mod:`.guidance`: classifier-free guidance of an autoregressive step (TarFlow's and STARFlow's).
- :mod:`.jacobi`: GS-Jacobi inversion with the paper's convergence-ranking and initial-guess metrics.
- :mod:`.sampling`: ``sample_nf`` with ``solver="sequential" | "gs-jacobi"``.
- :mod:`.train`: training through the library's trainer (checkpoints, resume).
- :mod:`.starflow`: STARFlow, a deep-shallow TarFlow in the latent space of the library's autoencoder
  with a learned denoiser (a decoder fine-tuned on noisy latents).

Importing this package registers ``"tarflow"`` (and ``"starflow"``) in the model registry, so
``straightflow.load`` rebuilds these runs.
"""
from __future__ import annotations

from ..models import MODELS
from .guidance import GUIDANCE_KINDS, guide
from .jacobi import BlockPlan, JacobiStats, block_metrics, gs_jacobi, jacobi_block, plan_from_metrics
from .sampling import NF_SOLVERS, NFSample, nf_solvers, sample_nf
from .starflow import StarFlow, train_starflow
from .tarflow import ARBlock, TarFlow, bits_per_dim_offset
from .tokens import from_tokens, to_tokens, token_shape
from .train import NFObjective, default_nf_config, is_nf_config, train_nf

if "tarflow" not in MODELS:
    MODELS.register("tarflow")(TarFlow)

__all__ = [
    "TarFlow", "ARBlock", "bits_per_dim_offset", "guide", "GUIDANCE_KINDS", "BlockPlan", "JacobiStats",
    "gs_jacobi", "jacobi_block", "block_metrics", "plan_from_metrics", "sample_nf", "NFSample", "NF_SOLVERS",
    "nf_solvers", "NFObjective", "train_nf", "default_nf_config", "is_nf_config", "to_tokens", "from_tokens",
    "token_shape", "StarFlow", "train_starflow",
]
