"""Straighten and compress flows: reflow pairs, k-rectified flow, distillation, one-step models.

- :mod:`.pairs`: ``generate_pairs`` (sharded, resumable, torchrun-parallel) and ``load_pairs``.
- :mod:`.reflow`: ``reflow`` (k-RF, improved training, SlimFlow annealing, curved paths),
  ``sample_renoise`` and ``straightness_report``.
- :mod:`.distill`: k-step distillation (perceptual option), SlimFlow flow-guided distillation,
  conditional (InstaFlow-style) one-step students.
- :mod:`.meanflow`: MeanFlow (JVP target) and SplitMeanFlow average-velocity models, ``sample_mean``.
- :mod:`.wcfm`: weighted conditional flow matching.
"""
from . import distill, meanflow, pairs, reflow, wcfm  # noqa: F401
from .distill import DistillObjective, conditional_onestep, distill as distill_pairs, slimflow_distill  # noqa: F401
from .meanflow import MeanFlow, SplitMeanFlow, sample_mean  # noqa: F401
from .pairs import StoredPairDataset, generate_pairs, load_pairs  # noqa: F401
from .reflow import AnnealedReflow, reflow as train_reflow, sample_renoise, straightness_report  # noqa: F401
from .wcfm import WeightedCFM  # noqa: F401
