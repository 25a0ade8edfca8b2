"""Image-scale flows: latent flow matching, resolution-aware and Bottleneck Sampling, fast sampling.

- :mod:`.latent`: autoencoder training, latent flow training, :class:`LatentFlow` (sample + decode).
- :mod:`.bottleneck`: Bottleneck Sampling (high -> low -> high resolution, Tian et al. 2025).
- :mod:`.fast`: compile-friendly fixed-step sampling loops, bf16 autocast, batched sampling to files,
  and the resolution-dependent time shift.
"""
from __future__ import annotations

from .bottleneck import bottleneck_sample
from .fast import FAST_SOLVERS, compile_model, fast_sample, sample_to_files, shift_for, shifted_grid_for
from .latent import LatentFlow, load_latent, train_autoencoder, train_latent_flow

__all__ = [
    "LatentFlow", "load_latent", "train_autoencoder", "train_latent_flow", "bottleneck_sample",
    "fast_sample", "sample_to_files", "compile_model", "shift_for", "shifted_grid_for", "FAST_SOLVERS",
]
