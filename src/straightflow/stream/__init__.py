"""Real-time streaming: Stream Batch, residual CFG, similarity filter, motion-aware strength,
bounded latest-frame queues and a websocket server (``straightflow serve`` / ``straightflow stream``).

See :mod:`straightflow.stream.pipeline` for the formulas and their adaptation to velocity
prediction (t = 0 noise, t = 1 data).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..checkpoint import load
from ..runs import cached_run
from .clips import builtin_clip, load_clip
from .filter import SimilarityFilter, skip_probability
from .pipeline import RCFG_MODES, CountingModel, MotionStrength, StreamBatchPipeline, StreamOutput, rows_per_call
from .offline import run_stream
from .queues import LatestQueue, StreamRunner

__all__ = [
    "StreamBatchPipeline", "StreamOutput", "MotionStrength", "CountingModel", "RCFG_MODES", "rows_per_call",
    "SimilarityFilter", "skip_probability", "LatestQueue", "StreamRunner", "builtin_clip", "load_clip",
    "default_run", "resolve_run", "load_stream_model", "run_stream", "DEFAULT_MODEL_STEPS",
]

DEFAULT_MODEL_STEPS = 1000


def _cache_dir() -> Path:
    return Path(os.environ.get("STRAIGHTFLOW_CACHE") or "~/.cache/straightflow").expanduser()


def default_run(steps: int = DEFAULT_MODEL_STEPS, progress: bool = True) -> Path:
    """The default streaming model: a class-conditional UNet (32 channels) trained on digits, once, cached.

    Lives in ``$STRAIGHTFLOW_CACHE/stream_model/digits-unet32-<steps>``
    (:func:`straightflow.runs.cached_run`); an interrupted training resumes on the next call.
    """
    recipe = {"data": "digits", "steps": int(steps), "batch_size": 128, "lr": 1e-3, "warmup": 100,
              "lr_schedule": "cosine", "ema": 0.999, "ckpt_every": 200, "seed": 0}
    return cached_run(_cache_dir() / "stream_model" / f"digits-unet32-{int(steps)}", recipe, progress=progress)


def resolve_run(run: Union[str, os.PathLike, None]) -> Path:
    """``run`` as a directory, or ``default``/``None`` for :func:`default_run`."""
    if run is None or str(run) in ("default", "builtin"):
        return default_run()
    p = Path(run)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a run directory (no config.json); train one with `straightflow train "
                                "--data digits --out RUN` or pass `default` for the cached digits model")
    return p


def load_stream_model(run: Union[str, os.PathLike, None]):
    """The image model of ``run`` (a run directory or ``default``), checked to work on images (C, H, W)."""
    model = load(resolve_run(run))
    shape = getattr(model, "sample_shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"streaming needs an image model (C, H, W); the model of {run} has sample shape {shape}")
    return model
