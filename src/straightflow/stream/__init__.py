"""Real-time streaming: Stream Batch, residual CFG, similarity filter, motion-aware strength,
bounded latest-frame queues and a websocket server (``straightflow serve`` / ``straightflow stream``).

See :mod:`straightflow.stream.pipeline` for the formulas and their adaptation to velocity
prediction (t = 0 noise, t = 1 data).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

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
    "default_run", "resolve_run", "load_stream_model", "run_stream", "DEFAULT_MODEL_STEPS", "DEFAULT_RECIPE",
]

# The default streaming model: a class-conditional UNet on the procedural shapes at 32x32 (RGB), the
# domain of the built-in clip (a disc and a square moving), so img2img output visibly tracks the input.
DEFAULT_RECIPE: Dict[str, Any] = {"data": "shapes32", "n": 4000, "steps": 400, "batch_size": 32, "base_channels": 16,
                                  "lr": 2e-3, "warmup": 50, "lr_schedule": "cosine", "ema": 0.999,
                                  "ckpt_every": 100, "seed": 0}
DEFAULT_MODEL_STEPS = DEFAULT_RECIPE["steps"]
DEFAULT_MODEL_MINUTES = 2  # training time of the default recipe on a 2-core CPU (93 s measured 2026-12-02; BENCHMARKS.md)


def _cache_dir() -> Path:
    return Path(os.environ.get("STRAIGHTFLOW_CACHE") or "~/.cache/straightflow").expanduser()


def default_run(steps: int = DEFAULT_MODEL_STEPS, progress: bool = True, log: Optional[Callable[[str], None]] = None,
                device: Optional[str] = None) -> Path:
    """The default streaming model (:data:`DEFAULT_RECIPE`): a class-conditional UNet (16 base
    channels) on 32x32 shapes, trained once on first use and cached.

    Lives in ``$STRAIGHTFLOW_CACHE/stream_model/shapes32-unet16-<steps>``
    (:func:`straightflow.runs.cached_run`); an interrupted training resumes on the next call.
    ``log(msg)`` hears, before training starts, what is trained, for how long and where it is kept.
    """
    recipe = {**DEFAULT_RECIPE, "steps": int(steps)}
    minutes = max(1, round(DEFAULT_MODEL_MINUTES * int(steps) / DEFAULT_MODEL_STEPS))
    say = None if log is None else (lambda m: log(
        f"first use: training the default streaming model (a class-conditional UNet on 32x32 moving shapes), "
        f"about {minutes} min on a 2-core CPU, once: {m}"))
    return cached_run(_cache_dir() / "stream_model" / f"shapes32-unet16-{int(steps)}", recipe, progress=progress,
                      log=say, device=device)


def resolve_run(run: Union[str, os.PathLike, None], progress: bool = True,
                log: Optional[Callable[[str], None]] = None, device: Optional[str] = None) -> Path:
    """``run`` as a directory, or ``default``/``None`` for :func:`default_run`."""
    if run is None or str(run) in ("default", "builtin"):
        return default_run(progress=progress, log=log, device=device)
    p = Path(run)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a run directory (no config.json); train one with `straightflow train "
                                "--data shapes32 --out RUN` or pass `default` for the cached shapes model")
    return p


def load_stream_model(run: Union[str, os.PathLike, None], device: Union[str, Any] = "cpu",
                      progress: bool = True, log: Optional[Callable[[str], None]] = None):
    """The image model of ``run`` (a run directory or ``default``) on ``device``, checked to work on
    images (C, H, W)."""
    model = load(resolve_run(run, progress=progress, log=log, device=str(device)), device=device)
    shape = getattr(model, "sample_shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"streaming needs an image model (C, H, W); the model of {run} has sample shape {shape}")
    return model
