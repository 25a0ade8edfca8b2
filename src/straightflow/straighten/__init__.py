"""Straighten and compress flows: reflow pairs and k-rectified flow (more modules: distillation,
one-step models).

- :mod:`.pairs`: ``generate_pairs`` (sharded, resumable, torchrun-parallel) and ``load_pairs``.
- :mod:`.reflow`: ``reflow`` (k-RF, improved training, SlimFlow annealing, curved paths),
  ``sample_renoise`` and ``straightness_report``.
"""
from . import pairs, reflow  # noqa: F401
