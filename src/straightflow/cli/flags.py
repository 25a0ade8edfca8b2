"""Flag groups shared by the commands, declared once: seeds, devices, model and training recipes,
solvers and grids. Each ``add_*`` adds a group to a sub-command's parser; the matching reader
turns the parsed namespace back into the library's values: :func:`recipe` builds the training
:class:`~straightflow.recipe.Recipe` once, :func:`train_settings` its ``TrainSettings``.

:func:`smoke_cap` is the one place the ``$STRAIGHTFLOW_MAX_STEPS`` smoke-test cap is read (beside the
global ``--max-steps`` flag); ``main`` applies it as an explicit override and says so once.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Tuple

from .. import coupling, grids, losses, paths, time as sftime
from ..checkpoint import CheckpointError, RunInfo, load, run_info
from ..recipe import DataSpec, ModelSpec, Objective, Recipe
from ..solvers import available as solver_names, choices as solver_choices
from ..system import DEVICE_CHOICES, resolve_device
from ..train import MAX_STEPS_ENV, TrainSettings
from ..trainlog import LOG_KINDS

__all__ = ["ints", "positive_ints", "positive_int", "int_pair", "float_pair", "add_seed", "add_quiet", "add_device",
           "add_model", "add_train", "add_path_recipe", "add_solver", "add_log", "train_kwargs", "train_settings", "recipe",
           "smoke_cap", "load_run", "device", "step_progress"]


def ints(s: str) -> List[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``."""
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def positive_ints(s: str) -> List[int]:
    """``"4,8"`` -> ``[4, 8]``, every value an integer >= 1 (NFE budgets, step counts)."""
    v = ints(s)
    if not v:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    bad = [x for x in v if x < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"every value must be an integer >= 1, got {', '.join(map(str, bad))}")
    return v


def positive_int(s: str) -> int:
    """A count that must be at least 1 (``--n``, ``--steps``): argparse's error otherwise."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def int_pair(s: str) -> Tuple[int, int]:
    """``"300,600"`` -> ``(300, 600)``."""
    v = ints(s)
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers, got {s!r}")
    return v[0], v[1]


def float_pair(s: str) -> List[float]:
    """``"0.3,0.7"`` -> ``[0.3, 0.7]``."""
    try:
        v = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {s!r}") from None
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {s!r}")
    return v


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=int, default=default, help="random seed (same seed, same output)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_device(p: argparse.ArgumentParser, default: str = "auto", help_suffix: str = "") -> None:
    p.add_argument("--device", default=default,
                   help=f"torch device: {DEVICE_CHOICES}" + (f" ({help_suffix})" if help_suffix else ""))


def device(a: argparse.Namespace):
    """The ``--device`` of a parsed command as a checked ``torch.device`` (``auto`` resolved)."""
    return resolve_device(getattr(a, "device", "auto"))


def add_model(p: argparse.ArgumentParser) -> None:
    """The default model's size: MLP ``--hidden``/``--depth`` (vectors), UNet ``--base-channels`` (images)."""
    p.add_argument("--hidden", type=int, default=256, help="MLP width (vector data)")
    p.add_argument("--depth", type=int, default=4, help="MLP residual blocks (vector data)")
    p.add_argument("--base-channels", type=int, default=32, help="UNet base channels (image data)")
    p.add_argument("--unconditional", action="store_true", help="ignore labels even if the data has them")


def add_path_recipe(p: argparse.ArgumentParser) -> None:
    """The flow-matching objective: path, training-time distribution, loss, coupling."""
    p.add_argument("--path", default="linear", help=f"one of: {', '.join(paths.available())}")
    p.add_argument("--time-dist", default="uniform", help=f"one of: {', '.join(sftime.available())}")
    p.add_argument("--loss", default="mse", help=f"one of: {', '.join(losses.available())}")
    p.add_argument("--coupling", default="independent", help=f"one of: {', '.join(coupling.available())}")


def add_log(p: argparse.ArgumentParser) -> None:
    """``--log`` (the training log in RUN/logs/, :mod:`straightflow.trainlog`) and ``--log-every``."""
    p.add_argument("--log", default="csv", choices=list(LOG_KINDS),
                   help="training log in OUT/logs/: scalars.csv and sample-grid PNGs (csv), TensorBoard event "
                   "files (tensorboard --logdir runs/), W&B (offline unless $WANDB_MODE says otherwise), or none")
    p.add_argument("--log-every", type=positive_int, default=50, help="log the scalars every N steps")


def add_train(p: argparse.ArgumentParser, steps: int = 5000, batch_size: int = 256, lr: float = 1e-3,
              warmup: int = 100, ema: float = 0.999, ckpt_every: int = 1000, schedule: bool = True) -> None:
    """Training settings (:class:`straightflow.train.TrainSettings`), seed, device and ``--quiet``."""
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=warmup, help="linear learning-rate warm-up steps")
    if schedule:
        p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
        p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=ema, help="EMA decay of the saved weights (0: no EMA)")
    p.add_argument("--ckpt-every", type=int, default=ckpt_every, help="checkpoint every N steps (resume after a kill)")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="resume OUT even though the recipe (data, objective, training settings) differs from the "
                   "saved one, continuing its weights with the new settings; without it such a resume is refused")
    add_seed(p)
    add_device(p)
    add_quiet(p)
    add_log(p)


# flag (namespace attribute) -> TrainSettings field, for train_settings
_SETTING_FLAGS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "warmup": "warmup", "ema": "ema_decay",
                  "ckpt_every": "ckpt_every", "seed": "seed", "lr_schedule": "lr_schedule", "grad_clip": "grad_clip",
                  "log": "log", "log_every": "log_every"}


def train_settings(a: argparse.Namespace, **fixed: Any) -> TrainSettings:
    """The :class:`~straightflow.train.TrainSettings` of a command's training flags (:func:`add_train`'s, or
    the subset a command has: ``--ema`` is ``ema_decay``, ``--quiet`` turns ``progress`` off, ``--device``
    is resolved). ``fixed``: the fields the command sets itself (``steps=a.train_steps``, a default of its
    own); a field with neither a flag nor a fixed value keeps the TrainSettings default."""
    kw: Dict[str, Any] = {field: getattr(a, flag) for flag, field in _SETTING_FLAGS.items() if hasattr(a, flag)}
    if hasattr(a, "device"):
        kw["device"] = str(device(a))
    if hasattr(a, "quiet"):
        kw["progress"] = not a.quiet
    kw.update(fixed)
    return TrainSettings(**kw)


def recipe(a: argparse.Namespace) -> Recipe:
    """The training :class:`~straightflow.recipe.Recipe` of ``straightflow train``'s flags, built once here."""
    return Recipe(data=DataSpec(a.data, n=a.n, resolution=a.resolution, conditional=not a.unconditional),
                  train=train_settings(a),
                  model=ModelSpec(a.model, hidden=a.hidden, depth=a.depth, base_channels=a.base_channels),
                  objective=Objective(path=a.path, time_dist=a.time_dist, loss=a.loss, coupling=a.coupling,
                                      cond_dropout=a.cond_dropout))


def train_kwargs(a: argparse.Namespace) -> Dict[str, Any]:
    """The settings of :func:`add_train` as keyword arguments of :func:`straightflow.runs.train_run`
    (kept for callers of the keyword form; :func:`train_settings` is the value)."""
    s = train_settings(a)
    kw = {"batch_size": s.batch_size, "lr": s.lr, "warmup": s.warmup, "ema": s.ema_decay, "ckpt_every": s.ckpt_every,
          "seed": s.seed, "device": s.device, "progress": s.progress, "allow_recipe_change": a.allow_recipe_change}
    if hasattr(a, "lr_schedule"):
        kw.update(lr_schedule=s.lr_schedule, grad_clip=s.grad_clip)
    return kw


def smoke_cap(a: argparse.Namespace) -> Optional[int]:
    """The smoke-test step cap: the global ``--max-steps N``, else ``$STRAIGHTFLOW_MAX_STEPS``, else None.
    The only place the library's command line reads it; a value that is not an integer >= 1 is an error."""
    cap = getattr(a, "max_steps", None)
    if cap is not None:
        if cap < 1:
            raise ValueError(f"--max-steps must be an integer >= 1 (a cap on training steps), got {cap}")
        return int(cap)
    raw = os.environ.get(MAX_STEPS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"${MAX_STEPS_ENV} must be a positive integer (a cap on training steps), got {raw!r}")
    return int(raw)


def add_solver(p: argparse.ArgumentParser, solver: str = "euler", steps: int = 8, grid: bool = True,
               nfe: bool = False) -> None:
    """``--solver`` (any registered name), ``--steps`` and ``--grid``.

    ``nfe=True`` (``sample``): also ``--nfe K``, a budget in velocity evaluations for every solver (the
    stored calibration for K when one is valid, else ``--solver`` at the most steps within K, else the
    measured ``auto`` solver); ``--solver`` and ``--steps`` then default to None so that the command can
    tell what was given (unset: ``solver``, ``steps``), and ``--steps`` with ``--nfe`` is refused.
    """
    names = solver_choices() if nfe else solver_names()
    p.add_argument("--solver", default=None if nfe else solver,
                   help=f"one of: {', '.join(names)}" + (f" (default {solver}; with --nfe: the stored calibration, "
                                                          "else auto)" if nfe else ""))
    p.add_argument("--steps", type=positive_int, default=None if nfe else steps,
                   help=f"solver steps (NFE = steps x evaluations per step){f'; default {steps}' if nfe else ''}")
    if nfe:
        p.add_argument("--nfe", type=positive_int, default=None,
                       help="budget in velocity evaluations per sample, for every solver: a stored calibration "
                            "for it when one is valid (see `straightflow calibrate`), else --solver at the most "
                            "steps within it, else solver auto; not with --steps")
    if grid:
        p.add_argument("--grid", default="uniform", help=f"one of: {', '.join(grids.available())}")


class StepProgress:
    """A tqdm bar over a solve's steps, advanced by the solver's ``callback(i, t, x)`` and created at
    the first step (so input errors are raised before any bar shows); ``close()`` when done."""

    def __init__(self, steps: int, desc: str = "sample") -> None:
        self.steps, self.desc, self.bar = steps, desc, None

    def __call__(self, i, t, x) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, unit="step", desc=self.desc, dynamic_ncols=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_progress(steps: int, enabled: bool, desc: str = "sample", threshold: int = 200):
    """A :class:`StepProgress` for a long solve (``steps >= threshold``) when ``enabled``, else None."""
    return StepProgress(steps, desc) if enabled and steps >= threshold else None


def load_run(run: str, device: Any = "cpu") -> Tuple[Any, RunInfo]:
    """``(model, RunInfo)`` of a run directory (clear errors for a missing or broken one)."""
    model = load(run, device=device)
    info = run_info(model)
    if info.shape is None:
        raise CheckpointError(f"{run}/config.json records no data shape (config['data']['shape']); "
                              "it was not written by the straightflow trainer")
    return model, info
