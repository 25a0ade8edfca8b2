"""Metrics: W2, sliced W2, MMD, straightness, PSNR/SSIM and a classifier Fréchet distance.

Distribution metrics (``w2``, ``sliced_w2``, ``mmd``, ``fd``) compare two sets of samples;
every report should print the *data-vs-data floor* beside the figure (:func:`evaluate`,
:class:`MetricReport`), because a finite-sample metric is never zero even between two draws
of the same distribution.

Conventions: images are float32 ``(N, C, H, W)`` in ``[-1, 1]``; vectors ``(N, D)``. Every
distribution metric flattens its inputs to ``(N, D)``. All randomness is seeded.

Classifier Fréchet distance. Inception-FID does not apply to 8x8 digits and its weights
cannot be downloaded here, so the project trains its own small CNN (:class:`DigitClassifier`)
with the recipe in :func:`train_classifier` and measures the Fréchet distance between
Gaussians fitted to its penultimate-layer features. Weights are cached at
``$STRAIGHTFLOW_CACHE/classifiers/<name>-<RECIPE_VERSION>.safetensors`` (default cache
``~/.cache/straightflow``), with a JSON beside them holding the held-out accuracy; they are
trained on first use (a few seconds on 2 CPU cores) and loaded afterwards.

Modules (each with its formulas):

- :mod:`.arrays` -- ``ArrayLike`` and the float64 ``(N, D)`` conversion of sample sets;
- :mod:`.distances` -- ``w2``, ``sliced_w2``, ``mmd``, ``straightness``;
- :mod:`.images` -- ``psnr``, ``ssim``;
- :mod:`.classifier` -- ``DigitClassifier``, its recipes, ``train_classifier``, the on-disk
  cache and ``feature_extractor``;
- :mod:`.frechet` -- ``frechet_distance``, ``classifier_features``, ``classifier_fd``;
- :mod:`.evaluation` -- the ``METRICS`` registry, ``available``, ``MetricReport``, ``evaluate``.
"""
from __future__ import annotations

from typing import Any

from .. import io  # noqa: F401  (``straightflow.metrics.io``: the tests read the cache's JSON with it)
from . import classifier as _classifier
from .arrays import ArrayLike  # noqa: F401
from .classifier import (  # noqa: F401
    _MEMO,
    RECIPE_VERSION,
    DigitClassifier,
    _accuracy,
    _split,
    classifier_cache_path,
    feature_extractor,
    load_digits_images,
    train_classifier,
)
from .distances import mmd, sliced_w2, straightness, w2
from .evaluation import METRICS, MetricReport, MetricSpec, available, evaluate
from .frechet import classifier_features, classifier_fd, frechet_distance
from .images import psnr, ssim

__all__ = [
    "w2",
    "sliced_w2",
    "mmd",
    "straightness",
    "psnr",
    "ssim",
    "frechet_distance",
    "classifier_fd",
    "DigitClassifier",
    "train_classifier",
    "feature_extractor",
    "load_digits_images",
    "classifier_features",
    "classifier_cache_path",
    "MetricSpec",
    "MetricReport",
    "evaluate",
    "available",
    "METRICS",
    "RECIPE_VERSION",
]

# Process-wide counters that the classifier module rebinds (``_TRAIN_CALLS += 1``): a name imported
# here would be a stale copy, so ``straightflow.metrics.<name>`` reads the live value from there.
_LIVE = {"_TRAIN_CALLS": _classifier}


def __getattr__(name: str) -> Any:
    if name in _LIVE:
        return getattr(_LIVE[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LIVE))
