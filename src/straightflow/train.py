"""Training loop: AdamW + warm-up/cosine, gradient clipping, EMA, atomic checkpoints, exact resume, DDP.

``train(flow, data, steps, out)`` (or ``Trainer(...).fit()``) minimises ``flow.loss`` on
minibatches of ``data`` and returns a :class:`TrainResult` whose ``model`` is the EMA model.

Data. ``data`` is a :class:`~straightflow.data.Dataset`-like object (``.x``, optional ``.y`` and
``.num_classes``), a :class:`~straightflow.coupling.PairDataset` (its stored noise ``x0`` is
passed to ``flow.loss``), or a plain tensor ``(N, ...)``. Minibatches are drawn without
replacement from a fresh random permutation every epoch (a CPU ``torch.Generator``); labels go
to the model as ``cond={"y": ...}``. The flow's noise/time draws use a second generator on the
training device, so a run is a pure function of ``seed``.

Files in ``out/`` (all written atomically: temp file + fsync + rename; never pickle):

- ``train_state.safetensors``: the source of truth for resuming, written FIRST at every
  checkpoint. Tensors: ``model/<name>`` (raw weights and buffers), ``ema/<name>`` (EMA),
  ``optim/<param index>/<key>`` (AdamW state, ``step`` included), ``rng/data/<rank>``,
  ``rng/noise/<rank>``, ``rng/torch/<rank>`` (and ``rng/cuda/<rank>``) generator states as
  uint8, ``sampler/perm/<rank>`` (the epoch permutation). The safetensors metadata key
  ``"straightflow.train_state"`` holds JSON: step, settings, optimizer param groups and scalar
  state, sampler positions, loss history, model/flow/data signatures.
- ``model.safetensors`` + ``config.json`` (EMA weights; config sections ``flow``, ``train``,
  ``data``, ``model`` plus ``extra_config``) via :func:`straightflow.checkpoint.save_model`,
  written after the state file, so a kill between the two files is harmless.

Resume. If ``out/train_state.safetensors`` exists, training continues from it up to ``steps``
and reproduces the uninterrupted run bit for bit on CPU (same thread count): weights, EMA,
optimizer state, every generator state and the sampler position are restored, and "resuming
from step N of M" is printed (with progress on). What the saved tensors must fit (world size,
model architecture, data shape and size, EMA on/off) must match, else :class:`ResumeError`. The
recipe (the training settings of :attr:`TrainSettings.RECIPE_FIELDS`, the flow objective, the data
set's name or ``data_source``) must match too, unless ``allow_recipe_change=True``: a changed
``--lr`` or ``--data`` is refused with the differences named, never silently applied or ignored.
``steps`` may grow (that is how a run is extended); a finished run asked for the same steps says
so and trains nothing. ``config.json`` records the step its weights are from (``"step"``), so an
interrupted run is recognisable (:attr:`straightflow.checkpoint.RunInfo.unfinished`). With
``lr_schedule="cosine"`` the decay horizon is ``lr_decay_steps`` (default: ``steps``); fix it when
you plan to extend a run.

Multi-process. Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer initialises the process group
(gloo on CPU, nccl on CUDA, one GPU per ``LOCAL_RANK``), wraps the model in
``DistributedDataParallel`` and seeds rank ``r``'s generators with ``seed + r``: every rank draws
its own ``batch_size`` samples, so the effective batch is ``world_size * batch_size``. Only rank 0
shows progress and writes files (barriers around writes); the logged loss is the mean over ranks.
Every rank's generator states are gathered into the state file (``rng/*/<rank>``), so a DDP run
resumes exactly too, with the same world size. All ranks read the state file, so ``out`` must be
on a file system they share. A trainer that initialised the group destroys it when ``fit`` ends;
a script that trains several times in one ``torchrun`` launch should call
``dist.init_process_group`` itself (the trainer then reuses the group and leaves it alone), since
re-initialising a destroyed group against torchrun's store is unreliable.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .io import CheckpointError, load_tensors, save_tensors
from .system import resolve_device
from .trainlog import TrainLog, check_log, sample_grid

__all__ = ["Trainer", "TrainSettings", "TrainResult", "train", "NonFiniteLossError", "ResumeError", "STATE_FILE",
           "read_train_state", "MAX_STEPS_ENV", "max_steps_cap", "max_steps", "Interrupted", "StopRequest",
           "interruptible"]

STATE_FILE = "train_state.safetensors"
STATE_FORMAT = 1
_META_KEY = "straightflow.train_state"
LR_SCHEDULES = ("constant", "cosine")
_NOISE_SEED_OFFSET = 1_000_003  # noise generator of rank r: seed + r + this (data generator: seed + r)
MAX_DATA_MAGNITUDE = 1e6  # larger data values are refused before training (see _resolve_data)
MAX_STEPS_ENV = "STRAIGHTFLOW_MAX_STEPS"  # the variable the command line (cli/ only) reads a smoke cap from
_STEP_CAP: "ContextVar[Optional[int]]" = ContextVar("straightflow_max_steps", default=None)


def _cap_value(max_steps: Any) -> int:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1 (a cap on training steps), got {max_steps!r}")
    return int(max_steps)


@contextmanager
def max_steps(cap: Optional[int], announce: Optional[str] = None) -> Iterator[Optional[int]]:
    """Within the block, every training run is capped at ``cap`` steps (the smoke-test override; None:
    no cap). The command line enters it from ``--max-steps`` or ``$STRAIGHTFLOW_MAX_STEPS`` (read in
    ``cli/`` only), the tests from a fixture. ``announce`` (e.g. ``"straightflow"``) prints one line
    saying so when the block starts. Nothing below the command line reads the environment."""
    if cap is not None:
        cap = _cap_value(cap)
        if announce:
            print(f"[{announce}] smoke cap: every training run stops after at most {cap} steps "
                  "(not a real run)", file=sys.stderr, flush=True)
    token = _STEP_CAP.set(cap)
    try:
        yield cap
    finally:
        _STEP_CAP.reset(token)


def max_steps_cap() -> Optional[int]:
    """The step cap of the enclosing :func:`max_steps` block, or None (never read from the environment)."""
    return _STEP_CAP.get()

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- interruption (Ctrl-C, SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A long job stopped on SIGINT/SIGTERM at a step boundary, after writing a checkpoint there.

    ``str(e)`` is the one line the command line prints ("interrupted at step N of M; rerun the same
    command to resume"); ``step``, ``total``, ``unit`` (``"step"``, ``"shard"``) and ``out`` (where the
    checkpoint is, None when nothing was saved) say where. A ``KeyboardInterrupt`` subclass, so code
    that catches ``Exception`` does not swallow it."""

    def __init__(self, step: int, total: int, out: Optional[PathLike] = None, unit: str = "step") -> None:
        self.step, self.total, self.unit = int(step), int(total), str(unit)
        self.out = None if out is None else Path(out)
        super().__init__(self.message())

    def message(self) -> str:
        where = f"interrupted at {self.unit} {self.step} of {self.total}"
        if self.out is None:
            return where + "; nothing was saved (no output directory)"
        return where + "; rerun the same command to resume"

    def __str__(self) -> str:
        return self.message()


class StopRequest:
    """The flag :func:`interruptible` sets: ``signal`` is the first signal number received (None: none)."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None


_STOP_FLAGS: List[StopRequest] = []  # the open interruptible() blocks (nested blocks share the handlers)


def _on_signal(signum, frame) -> None:
    if signum == signal.SIGINT and any(_STOP_FLAGS):
        raise KeyboardInterrupt  # a second Ctrl-C: stop now (every file is written atomically)
    for f in _STOP_FLAGS:
        if f.signal is None:
            f.signal = signum


@contextmanager
def interruptible() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the yielded :class:`StopRequest` instead of stopping the
    process, so a loop can finish its step, checkpoint and raise :class:`Interrupted`; a second Ctrl-C
    raises ``KeyboardInterrupt`` at once. The previous handlers come back when the block ends. Off the
    main thread (where handlers cannot be set) and for a signal the process ignores, nothing changes.
    The one mechanism every training loop (:class:`Trainer`) and pair generation use."""
    flag = StopRequest()
    installed: Dict[int, Any] = {}
    if not _STOP_FLAGS and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                prev = signal.getsignal(sig)
                if prev is signal.SIG_IGN or prev is None:
                    continue  # ignored on purpose (nohup, a background job): keep it so
                installed[sig] = signal.signal(sig, _on_signal)
            except (ValueError, OSError):  # not the main interpreter
                pass
    _STOP_FLAGS.append(flag)
    try:
        yield flag
    finally:
        _STOP_FLAGS.remove(flag)
        for sig, prev in installed.items():
            signal.signal(sig, prev)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf; raised before the optimizer step."""

    def __init__(self, message: str, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class ResumeError(ValueError):
    """The saved training state does not fit the current run (different model, batch size...)."""


@dataclass
class TrainResult:
    run_dir: Optional[Path]
    model: nn.Module  # EMA model (the raw model's copy when EMA is off), eval mode
    raw_model: nn.Module
    steps: int
    final_loss: float
    history: List[Tuple[int, float]] = field(default_factory=list)
    resumed_from: Optional[int] = None  # the step a saved state was resumed from (None: a fresh run)
    recipe_changes: List[str] = field(default_factory=list)  # what an allowed resume changed


# ----------------------------------------------------------------------------- helpers


def _all_finite(x: Tensor) -> bool:
    # A finite sum means every value is finite (cheaper than a bool reduction on CPU).
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _resolve_data(data: Any):
    """-> (x, y, x0, num_classes, name)."""
    x0 = y = num_classes = None
    if isinstance(data, Tensor):
        x, name = data, "tensor"
    elif hasattr(data, "x0") and hasattr(data, "x1"):  # PairDataset
        x, x0 = data.x1, data.x0
        y, num_classes = getattr(data, "y", None), getattr(data, "num_classes", None)
        name = getattr(data, "name", "pairs")
    elif hasattr(data, "x"):
        x, y = data.x, getattr(data, "y", None)
        num_classes, name = getattr(data, "num_classes", None), getattr(data, "name", "data")
    else:
        raise TypeError(f"data must be a Dataset (with .x), a PairDataset or a Tensor, got {type(data).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"data.x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"data has shape {tuple(x.shape)}; expected (N, D) vectors or (N, C, H, W) images")
    if x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"data {name!r} is empty (shape {tuple(x.shape)}); nothing to train on")
    if not x.is_floating_point():
        raise ValueError(f"data {name!r} has dtype {x.dtype}; expected floating point (scale images to [-1, 1])")
    for what, v in (("x", x), ("x0", x0)):
        if v is not None and not _all_finite(v):
            n_bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"data {name!r}: {what} contains {n_bad} NaN/Inf values; clean the data before training")
        if v is not None and float(v.abs().max()) > MAX_DATA_MAGNITUDE:
            raise ValueError(
                f"data {name!r}: {what} has values up to {float(v.abs().max()):.3g}; flow matching pairs the data with "
                f"N(0, I) noise, so scale it to about unit range first (standardise each feature; images to [-1, 1]). "
                f"Values beyond {MAX_DATA_MAGNITUDE:.0e} are refused: the noise vanishes next to them and the loss "
                "overflows")
    if x0 is not None and x0.shape != x.shape:
        raise ValueError(f"stored noise x0 shape {tuple(x0.shape)} != data shape {tuple(x.shape)}")
    if y is not None:
        if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"labels y must be an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels y have shape {tuple(y.shape)}; expected ({x.shape[0]},)")
        y = y.long()
        if num_classes is None:
            num_classes = int(y.max()) + 1
    return x.detach(), y, (None if x0 is None else x0.detach()), num_classes, str(name)


def _total_norm(params: Sequence[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class _Sampler:
    """Minibatch indices without replacement: a fresh ``randperm`` per epoch from ``generator``."""

    def __init__(self, n: int, batch: int, generator: torch.Generator) -> None:
        self.n, self.batch, self.g = n, batch, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> Tensor:
        end = self.pos + self.batch
        if end <= self.n:
            idx = self.perm[self.pos:end]
            self.pos = end
            return idx
        parts = [self.perm[self.pos:]]
        need = end - self.n
        while need > 0:
            self.perm = torch.randperm(self.n, generator=self.g)
            take = min(need, self.n)
            parts.append(self.perm[:take])
            self.pos, need = take, need - take
        return torch.cat(parts)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, Tensor) and v.numel() == 1:
        return v.item()
    return v


def _param_signature(model: nn.Module) -> Dict[str, List]:
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}


def read_train_state(path: PathLike) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Load ``train_state.safetensors`` -> ``(tensors, meta)`` (refuses pickles, checks truncation)."""
    path = Path(path)
    tensors = load_tensors(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = (header.get("__metadata__") or {}).get(_META_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not a straightflow training state (no {_META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt training-state metadata ({e})") from e
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: training-state format {meta.get('format')!r}, expected {STATE_FORMAT}")
    return tensors, meta



# ----------------------------------------------------------------------------- settings


def _int(name: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of a training run, validated once; ``config.json``'s ``"train"`` section.

    ``ckpt_every=0``: checkpoint only at the end. ``ema_decay=0``: no EMA (the saved/returned model
    is then the raw model). EMA warm-up (``ema_warmup=True``, the default): the decay of the ``k``-th
    EMA update (``k = 1, 2, ...``, counted from ``ema_start``) is ``min(ema_decay, k / (9 + k))``,
    i.e. diffusers' ``(1 + n) / (10 + n)`` rule with ``n = k - 1`` updates before it, so the EMA
    follows the raw weights early on (0.1 at the first update, 0.9 after 81, 0.99 after 891) and
    a short run is not dominated by its initial weights; ``ema_warmup=False`` uses ``ema_decay``
    from the first update. The decay is a pure function of the step, so resume stays bit-exact.
    ``grad_clip=0``: no clipping (the gradient norm is still checked for
    NaN/Inf). With ``lr_schedule="cosine"`` the decay horizon is ``lr_decay_steps`` (default
    ``steps``). ``log``: the training log written into ``out/logs/`` (:mod:`straightflow.trainlog`:
    ``"csv"``, ``"tensorboard"``, ``"wandb"`` or ``"none"``). :meth:`to_config` / :meth:`from_config` are
    the one place these are written to and read from a run's config.
    """

    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    lr_schedule: str = "constant"
    lr_decay_steps: Optional[int] = None
    ema_decay: float = 0.999
    ema_start: int = 0
    ema_warmup: bool = True
    grad_clip: float = 1.0
    ckpt_every: int = 1000
    log_every: int = 50
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    log: str = "csv"

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalised once, here)
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("ema_start", 0), ("ckpt_every", 0),
                          ("log_every", 1), ("seed", 0)):
            put(name, _int(name, getattr(self, name), low))
        if self.lr_decay_steps is not None:
            put("lr_decay_steps", _int("lr_decay_steps", self.lr_decay_steps, 1))
        lr = self.lr
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        put("lr", float(lr))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        put("weight_decay", float(self.weight_decay))
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        put("betas", betas)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        ema = 0.0 if self.ema_decay is None else float(self.ema_decay)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA), got {ema}")
        put("ema_decay", ema)
        clip = 0.0 if self.grad_clip is None else float(self.grad_clip)
        if not (math.isfinite(clip) and clip >= 0):
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {clip}")
        put("grad_clip", clip)
        if not isinstance(self.ema_warmup, bool):
            raise ValueError(f"ema_warmup must be True or False, got {self.ema_warmup!r}")
        put("device", str(self.device))
        put("progress", bool(self.progress))
        put("log", check_log(self.log))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay used at step ``step`` (1-based); 0 up to ``ema_start`` (the EMA copies the weights).

        With ``ema_warmup``: ``min(ema_decay, (1 + n) / (10 + n))``, ``n = step - ema_start - 1``."""
        if step <= self.ema_start:
            return 0.0
        if not self.ema_warmup:
            return self.ema_decay
        n = step - self.ema_start - 1
        return min(self.ema_decay, (1.0 + n) / (10.0 + n))

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (1-based): ``lr * min(1, step / warmup)``, then for
        ``cosine`` times ``(1 + cos(pi p)) / 2`` with ``p`` the fraction of the decay horizon done."""
        f = 1.0
        if self.warmup and step <= self.warmup:
            f = step / self.warmup
        if self.lr_schedule == "cosine" and step > self.warmup:
            horizon = self.lr_decay_steps or self.steps
            p = min(1.0, (step - self.warmup) / max(1, horizon - self.warmup))
            f *= 0.5 * (1.0 + math.cos(math.pi * p))
        return self.lr * f

    def replace(self, **changes: Any) -> "TrainSettings":
        return dataclasses.replace(self, **changes)

    def capped(self, max_steps: int) -> "TrainSettings":
        """The smoke-test override: these settings with at most ``max_steps`` steps (the one
        implementation of the cap; :meth:`straightflow.recipe.Recipe.with_max_steps` uses it)."""
        cap = _cap_value(max_steps)
        return self if self.steps <= cap else self.replace(steps=cap)

    # the settings that change what a run means: resuming with any of them changed is refused unless
    # asked for (steps may grow; ckpt_every, log_every, device and progress change nothing learned)
    RECIPE_FIELDS = ("batch_size", "lr", "weight_decay", "betas", "warmup", "lr_schedule", "lr_decay_steps",
                     "ema_decay", "ema_start", "ema_warmup", "grad_clip", "seed")

    def changes_from(self, saved: Dict[str, Any]) -> List[str]:
        """``["lr: saved 0.001, now 0.002", ...]``: the recipe fields in which these settings differ from
        a saved ``"train"`` config section (read with :meth:`from_config`)."""
        old = TrainSettings.from_config(saved, progress=False)
        return [f"{k}: saved {getattr(old, k)!r}, now {getattr(self, k)!r}"
                for k in self.RECIPE_FIELDS if getattr(old, k) != getattr(self, k)]

    def to_config(self, world_size: int = 1, device: Optional[Union[str, torch.device]] = None) -> Dict[str, Any]:
        """The JSON ``"train"`` section of a run's config (and of its training state)."""
        out: Dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "progress"}
        out["betas"] = list(self.betas)
        out["device"] = str(self.device if device is None else device)
        out["world_size"] = int(world_size)
        return out

    @classmethod
    def from_config(cls, cfg: Dict[str, Any], **overrides: Any) -> "TrainSettings":
        """Settings from a ``"train"`` config section (keys that are not settings, such as
        ``world_size``, are ignored); ``overrides`` replace fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if k == "betas" else v) for k, v in cfg.items() if k in names}
        if "ema_decay" in cfg and "ema_warmup" not in cfg:
            kw["ema_warmup"] = False  # written before the warm-up existed: those runs used the constant decay
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Flow-matching trainer; see the module docstring for files, resume and DDP.

    ``ckpt_every=0``: checkpoint only at the end. ``out=None``: no files at all (in-memory).
    ``ema_decay=0`` (or None): no EMA; the saved/returned model is then the raw model.
    ``grad_clip=0`` (or None): no clipping (the gradient norm is still checked for NaN/Inf).
    """

    def __init__(
        self,
        flow,
        data,
        out: Optional[PathLike],
        steps: Optional[int] = None,
        settings: Optional[TrainSettings] = None,
        extra_config: Optional[Dict[str, Any]] = None,
        allow_recipe_change: bool = False,
        desc: str = "train",
        **options: Any,
    ) -> None:
        """``settings`` (a :class:`TrainSettings`) and/or its fields as keywords (``batch_size=...``,
        ``lr=...``), which override the fields of ``settings``; ``steps`` is needed either way.

        Resuming ``out`` with another recipe (training settings in :attr:`TrainSettings.RECIPE_FIELDS`,
        the flow objective, the data set or its ``data_source``) raises :class:`ResumeError` naming
        what differs, unless ``allow_recipe_change`` (the changes are then recorded in the config's
        ``"recipe_changes"``). ``desc`` labels the progress bar and messages (e.g. the stage)."""
        if settings is None:
            if steps is None:
                raise ValueError("Trainer needs steps (or settings=TrainSettings(steps=...))")
            settings = TrainSettings(steps=steps, **options)
        elif not isinstance(settings, TrainSettings):
            raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
        elif steps is not None or options:
            settings = settings.replace(**options, **({} if steps is None else {"steps": steps}))
        cap = max_steps_cap()  # a smoke cap set explicitly (straightflow.train.max_steps), announced where it was set
        if cap is not None:
            settings = settings.capped(cap)
        self.cfg = settings
        self.allow_recipe_change = bool(allow_recipe_change)
        self.desc = str(desc)
        self.resumed_from: Optional[int] = None
        self.recipe_changes: List[str] = []
        self.device = resolve_device(settings.device)
        if extra_config is not None:
            if not isinstance(extra_config, dict):
                raise TypeError(f"extra_config must be a dict, got {type(extra_config).__name__}")
            clash = sorted(set(extra_config) & {"flow", "train", "data", "model", "step", "recipe_changes"})
            if clash:
                raise ValueError(f"extra_config must not override the config sections {clash}")
            try:
                json.dumps(extra_config)
            except TypeError as e:
                raise ValueError(f"extra_config must be JSON-serialisable: {e}") from e
        self.extra_config = copy.deepcopy(extra_config) if extra_config else {}

        self.flow = flow
        model = getattr(flow, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"flow.model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("flow.model has no trainable parameters")
        self.model = model
        self.x, self.y, self.x0, self.num_classes, self.data_name = _resolve_data(data)
        if getattr(flow.coupling, "needs_pairs", False) and self.x0 is None:
            raise ValueError(f"coupling {flow.coupling.name!r} needs stored noise: pass a PairDataset as data")
        if self.y is not None and hasattr(model, "num_classes") and model.num_classes is None:
            raise ValueError(f"data {self.data_name!r} has labels but the model is unconditional "
                             "(num_classes=None); build the model with num_classes or drop the labels")
        self.out = None if out is None else Path(out)
        if self.out is not None:
            check_log(settings.log, available=True)  # a missing tensorboard/wandb is said before any work
        cfg = getattr(model, "config", None)
        if self.out is not None and not (isinstance(cfg, dict) and "name" in cfg):
            raise TypeError(f"{type(model).__name__} has no model.config dict with a 'name', so its checkpoint "
                            "could not be reloaded; use a straightflow.models model or pass out=None")
        self.world_size, self.rank, self.is_main, self._owns_pg = 1, 0, True, False
        self._built = False

    # ------------------------------------------------------------------ settings
    def settings(self) -> Dict[str, Any]:
        """The ``"train"`` config section of this run (:meth:`TrainSettings.to_config`)."""
        return self.cfg.to_config(self.world_size, self.device)

    def data_info(self) -> Dict[str, Any]:
        return {"name": self.data_name, "shape": list(self.x.shape[1:]), "size": int(self.x.shape[0]),
                "num_classes": self.num_classes, "labels": self.y is not None, "pairs": self.x0 is not None}

    def lr_at(self, step: int) -> float:
        """Learning rate used for step ``step`` (1-based)."""
        return self.cfg.lr_at(step)

    # ------------------------------------------------------------------ setup
    def _setup_dist(self) -> None:
        self.world_size, self.rank, self._owns_pg = 1, 0, False
        env_ws = int(os.environ.get("WORLD_SIZE", "1"))
        if env_ws > 1 or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
            if self.device.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
                self._owns_pg = True
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0

    def _build(self) -> None:
        self._setup_dist()
        dev = self.device
        self.model.to(dev)
        self.model.train()
        self.data_gen = torch.Generator().manual_seed(self.cfg.seed + self.rank)
        self.noise_gen = torch.Generator(device=dev).manual_seed(self.cfg.seed + self.rank + _NOISE_SEED_OFFSET)
        self.sampler = _Sampler(int(self.x.shape[0]), self.cfg.batch_size, self.data_gen)
        self.step, self.history, self.loss_acc = 0, [], [0.0, 0]
        self._change_log: List[Dict[str, Any]] = []
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        self.ema: Optional[nn.Module] = None
        if self.cfg.ema_decay > 0:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        state_path = None if self.out is None else self.out / STATE_FILE
        if state_path is not None and state_path.exists():
            self._restore(state_path)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        else:
            self.train_model = self.model
        # EMA bookkeeping: flat lists so an update is one foreach call, no per-parameter loop.
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._raw_float = [p.detach() for p in self.model.parameters()]
        self._raw_bufs = [b for b in self.model.buffers()]
        if self.ema is not None:
            self._ema_float = [p for p in self.ema.parameters()]
            self._ema_bufs = [b for b in self.ema.buffers()]
        self._built = True

    # ------------------------------------------------------------------ state I/O
    def _gather(self, t: Tensor) -> List[Tensor]:
        if self.world_size == 1:
            return [t]
        comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tt = t.to(comm)
        out = [torch.empty_like(tt) for _ in range(self.world_size)]
        dist.all_gather(out, tt)
        return [o.cpu() for o in out]

    def _rng_tensors(self) -> Dict[str, Tensor]:
        mine = {
            "rng/data": self.data_gen.get_state(),
            "rng/noise": self.noise_gen.get_state(),
            "rng/torch": torch.get_rng_state(),
            "sampler/perm": self.sampler.perm,
            "sampler/pos": torch.tensor([self.sampler.pos], dtype=torch.int64),
        }
        if self.device.type == "cuda":
            mine["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        out = {}
        for k, v in mine.items():
            for r, t in enumerate(self._gather(v)):
                out[f"{k}/{r}"] = t
        return out

    def _write_state(self) -> None:
        """Collective under DDP (gathers generator states); rank 0 writes."""
        rng = self._rng_tensors()
        if not self.is_main:
            return
        tensors: Dict[str, Tensor] = {}
        seen = set()

        def put(key: str, t: Tensor) -> None:
            t = t.detach()
            ptr = (t.untyped_storage().data_ptr(), t.device) if t.numel() else None
            if ptr is not None and ptr in seen:  # tied/shared storage: safetensors refuses aliases
                t = t.clone()
            elif ptr is not None:
                seen.add(ptr)
            tensors[key] = t

        for k, v in self.model.state_dict().items():
            put(f"model/{k}", v)
        if self.ema is not None:
            for k, v in self.ema.state_dict().items():
                put(f"ema/{k}", v)
        osd = self.optimizer.state_dict()
        scalar_state: Dict[str, Dict[str, Any]] = {}
        for idx, st in osd["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    put(f"optim/{idx}/{k}", v)
                else:
                    scalar_state.setdefault(str(idx), {})[k] = _jsonable(v)
        pos = [int(rng.pop(f"sampler/pos/{r}")[0]) for r in range(self.world_size)]
        tensors.update(rng)
        meta = {
            "format": STATE_FORMAT,
            "step": self.step,
            "settings": self.settings(),
            "world_size": self.world_size,
            "history": [[s, l] for s, l in self.history],
            "loss_acc": list(self.loss_acc),
            "sampler_pos": pos,
            "optimizer": {"param_groups": _jsonable(osd["param_groups"]), "scalar_state": scalar_state},
            "ema": self.ema is not None,
            "model_config": _jsonable(getattr(self.model, "config", None)),
            "params": _param_signature(self.model),
            "flow": _jsonable(self.flow.config()),
            "data": self.data_info(),
            "data_source": self.extra_config.get("data_source"),
            "recipe_changes": self._change_log,
        }
        save_tensors(self.out / STATE_FILE, tensors, metadata={_META_KEY: json.dumps(meta)})

    def _say(self, msg: str) -> None:
        if self.cfg.progress and self.is_main:
            print(f"[{self.desc}] {msg}", file=sys.stderr, flush=True)

    def _resume_problems(self, meta: Dict[str, Any]) -> Tuple[List[str], List[str]]:
        """``(impossible, recipe)``: differences from the saved run that make resuming impossible (the
        saved tensors do not fit) and those that change what the run means (refused unless allowed)."""
        s, now = meta["settings"], self.settings()
        impossible, recipe = [], []
        if s.get("world_size") != now["world_size"]:
            impossible.append(f"world_size: saved {s.get('world_size')!r}, now {now['world_size']!r}")
        if meta.get("model_config") != _jsonable(getattr(self.model, "config", None)):
            impossible.append(f"model config: saved {meta.get('model_config')}, now {getattr(self.model, 'config', None)}")
        elif meta.get("params") != _param_signature(self.model):
            impossible.append("model parameters (names/shapes/dtypes) differ from the saved ones")
        d, data_now = meta.get("data", {}), self.data_info()
        for key in ("shape", "size", "labels", "pairs"):
            if d.get(key) != data_now[key]:
                impossible.append(f"data {key}: saved {d.get(key)!r}, now {data_now[key]!r}")
        if bool(meta.get("ema")) != (self.ema is not None):
            impossible.append(f"EMA: saved {'on' if meta.get('ema') else 'off'}, now {'on' if self.ema is not None else 'off'}")
        recipe += self.cfg.changes_from(s)
        if meta.get("flow") != _jsonable(self.flow.config()):
            recipe.append(f"flow: saved {meta.get('flow')}, now {_jsonable(self.flow.config())}")
        source_then, source_now = meta.get("data_source"), self.extra_config.get("data_source")
        if source_then is not None and source_now is not None and source_then != source_now:
            recipe.append(f"data_source: saved {source_then!r}, now {source_now!r}")
        elif d.get("name") != data_now["name"]:
            recipe.append(f"data name: saved {d.get('name')!r}, now {data_now['name']!r}")
        return impossible, recipe

    def _restore(self, path: Path) -> None:
        tensors, meta = read_train_state(path)
        s = meta["settings"]
        impossible, recipe = self._resume_problems(meta)
        self._change_log = list(meta.get("recipe_changes") or [])
        if impossible:
            raise ResumeError(
                f"{path}: cannot resume, the saved run differs: " + "; ".join(impossible + recipe)
                + f". Use another output directory or delete {path.name} to start over.")
        if recipe and not self.allow_recipe_change:
            raise ResumeError(
                f"{self.out}: refusing to resume step {meta['step']} with another recipe: " + "; ".join(recipe)
                + ". Train into a new output directory (--out) for the new recipe, rerun with the saved settings "
                "to continue this run, or allow the change explicitly (allow_recipe_change=True, "
                "--allow-recipe-change) to continue these weights with the new settings.")
        if recipe:
            self.recipe_changes = recipe
            self._change_log.append({"step": int(meta["step"]), "changes": recipe})
        if (self.cfg.lr_schedule == "cosine" and s.get("lr_schedule") == "cosine"
                and (s.get("lr_decay_steps") or s.get("steps")) != (self.cfg.lr_decay_steps or self.cfg.steps)):
            warnings.warn("resuming a cosine schedule with a different decay horizon (steps / lr_decay_steps); "
                          "pass lr_decay_steps to keep it fixed across extensions", stacklevel=3)
        dev = self.device

        def sub(prefix: str) -> Dict[str, Tensor]:
            n = len(prefix)
            return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(sub("model/"))
        if self.ema is not None:
            self.ema.load_state_dict(sub("ema/"))
        groups = meta["optimizer"]["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        state: Dict[int, Dict[str, Any]] = {}
        for k, v in sub("optim/").items():
            idx, name = k.split("/", 1)
            state.setdefault(int(idx), {})[name] = v
        for idx, st in meta["optimizer"]["scalar_state"].items():
            state.setdefault(int(idx), {}).update(st)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        for g in self.optimizer.param_groups:  # the current call's hyper-parameters win
            g["betas"], g["weight_decay"] = self.cfg.betas, self.cfg.weight_decay
        r = self.rank
        self.data_gen.set_state(tensors[f"rng/data/{r}"])
        self.noise_gen.set_state(tensors[f"rng/noise/{r}"])
        torch.set_rng_state(tensors[f"rng/torch/{r}"])
        if dev.type == "cuda" and f"rng/cuda/{r}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng/cuda/{r}"], dev)
        self.sampler.perm = tensors[f"sampler/perm/{r}"].clone()
        self.sampler.pos = int(meta["sampler_pos"][r])
        self.step = int(meta["step"])
        self.history = [(int(a), float(b)) for a, b in meta["history"]]
        self.loss_acc = [float(meta["loss_acc"][0]), int(meta["loss_acc"][1])]
        self.resumed_from = self.step
        if self.step > self.cfg.steps:
            warnings.warn(f"{path} is at step {self.step} > steps={self.cfg.steps}; nothing to train, "
                          "returning the saved state", stacklevel=3)
        elif self.step == self.cfg.steps:
            self._say(f"{self.out} is already trained to step {self.step} of {self.cfg.steps}; nothing to do "
                      "(ask for more steps to continue it)")
        else:
            self._say(f"resuming {self.out} from step {self.step} of {self.cfg.steps}"
                      + (f" with changes: {'; '.join(recipe)}" if recipe else ""))

    def _export_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    def _checkpoint(self) -> None:
        if self.out is None:
            return
        if self.world_size > 1:
            dist.barrier()
        self._write_state()  # first: the source of truth for resume
        if self.is_main:
            self._write_run()
        if self.world_size > 1:
            dist.barrier()

    def _write_run(self) -> None:
        """The loadable run beside the training state: exported weights and ``config.json`` (main rank)."""
        from .checkpoint import save_model

        config = {"flow": _jsonable(self.flow.config()), "train": self.settings(), "data": self.data_info(),
                  "step": self.step}
        if self._change_log:
            config["recipe_changes"] = copy.deepcopy(self._change_log)
        config.update(copy.deepcopy(self.extra_config))
        save_model(self.out, self._export_model(), config)

    # ------------------------------------------------------------------ loop
    def _check(self, loss: Tensor, gn: Tensor, stop: StopRequest) -> Tuple[float, float, bool]:
        """One host sync per step: the loss and gradient norm as floats (mean over ranks), and whether to
        stop after this step (a signal received; under DDP by any rank, so every rank stops at the same step)."""
        if self.world_size > 1:
            v = torch.stack((loss.detach().float(), gn.float(), torch.ones_like(gn.float()) * bool(stop)))
            dist.all_reduce(v)
            lv, gv, sv = v.tolist()
            return lv / self.world_size, gv / self.world_size, sv > 0
        if self.device.type == "cpu":
            return loss.item(), gn.item(), bool(stop)
        lv, gv = torch.stack((loss.detach().float(), gn.float())).tolist()
        return lv, gv, bool(stop)

    def _nonfinite(self, step: int, lv: float, gv: float, lr: float) -> NonFiniteLossError:
        what = "loss" if not math.isfinite(lv) else "gradient norm"
        last = "no checkpoint has been written yet"
        if self.out is not None and (self.out / STATE_FILE).exists():
            last = f"the last good checkpoint in {self.out} is left untouched"
        msg = (f"non-finite {what} at step {step}: loss={lv}, grad_norm={gv} (lr={lr:.3g}). Training stopped "
               f"before the optimizer step; {last}. Try a lower learning rate (e.g. lr={lr / 3:.2g}), a longer "
               "warmup or grad_clip, and check the data for NaN/Inf or extreme values.")
        return NonFiniteLossError(msg, step, lv, gv)

    def fit(self) -> TrainResult:
        ok = False
        try:
            if not self._built:
                self._build()
            elif self.world_size > 1 and self.train_model is self.model:
                raise RuntimeError("a distributed Trainer runs fit() once (the DDP wrapper and process group "
                                   "are released at the end); build a new Trainer with the same out= to resume")
            if self.step < self.cfg.steps:
                self._loop()
            ok = True
        finally:
            self._release_ddp(sync=ok)  # no barrier on the error path: a failed peer would never arrive
        return self._result()

    def _release_ddp(self, sync: bool = True) -> None:
        """Drop the DDP wrapper (its reducer holds the process group) before the group can go.

        Tearing a gloo group down while a DDP reducer or a peer's last collective still refers to it
        aborts the process at exit ("terminate called without an active exception"), so: unwrap,
        collect, meet every rank at a barrier, then destroy the group if the trainer created it.
        """
        tm = getattr(self, "train_model", None)
        if tm is not None and tm is not self.model:
            self.train_model = self.model
            gc.collect()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            if sync:
                dist.barrier()
            if self._owns_pg:
                dist.destroy_process_group()
                self._owns_pg = False

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        log = None
        if self.out is not None and self.is_main and self.cfg.log != "none":
            log = TrainLog(self.cfg.log, self.out, start_step=self.step, config=self.settings(), name=self.desc)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not (self.cfg.progress and self.is_main),
                   unit="step", dynamic_ncols=True, desc=self.desc)
        with interruptible() as stop:
            try:
                self._steps(stop, bar, log)
            finally:
                bar.close()
                if log is not None:
                    log.close()

    def _log_samples(self, log: Optional[TrainLog]) -> None:
        """The sample grid of the exported model at a checkpoint (a velocity flow on images or 2D points)."""
        from .flow import Flow

        if log is None or not isinstance(self.flow, Flow):
            return
        try:  # a picture for the log never stops the training run
            img = sample_grid(self._export_model(), self.x.shape[1:], self.num_classes, self.device,
                              seed=self.cfg.seed)
        except Exception as e:  # noqa: BLE001 - e.g. a NaN velocity at this checkpoint
            warnings.warn(f"no sample grid logged at step {self.step}: {e}", stacklevel=2)
            return
        if img is not None:
            log.image(self.step, img)

    def _steps(self, stop: StopRequest, bar, log: Optional[TrainLog] = None) -> None:
        """The steps from ``self.step + 1`` to ``steps``; on a stop request (:func:`interruptible`) the
        step in flight finishes, a checkpoint is written and :class:`Interrupted` raised."""
        x, y, x0 = self.x, self.y, self.x0
        dev = self.device
        host = dev.type == "cpu"
        flow, model, opt, sampler = self.flow, self.train_model, self.optimizer, self.sampler
        params, clip = self._params, self.cfg.grad_clip
        groups = opt.param_groups
        use_ema = self.ema is not None
        if use_ema:
            ema_p, raw_p, ema_b, raw_b = self._ema_float, self._raw_float, self._ema_bufs, self._raw_bufs
            ema_decay_at = self.cfg.ema_decay_at
        log_every, ckpt_every, steps = self.cfg.log_every, self.cfg.ckpt_every, self.cfg.steps
        acc = self.loss_acc
        smooth = None
        cur_lr = None
        clock, clock_step = time.perf_counter(), self.step
        for step in range(self.step + 1, steps + 1):
            lr = self.lr_at(step)
            if lr != cur_lr:
                for g in groups:
                    g["lr"] = lr
                cur_lr = lr
            idx = sampler.next()
            xb = x.index_select(0, idx)
            cond = None if y is None else {"y": y.index_select(0, idx)}
            x0b = None if x0 is None else x0.index_select(0, idx)
            if not host:
                xb = xb.to(dev, non_blocking=True)
                if cond is not None:
                    cond["y"] = cond["y"].to(dev, non_blocking=True)
                if x0b is not None:
                    x0b = x0b.to(dev, non_blocking=True)
            loss = flow.loss(xb, cond=cond, x0=x0b, generator=self.noise_gen, model=model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, clip)
            else:
                gn = _total_norm(params)
            lv, gv, stopping = self._check(loss, gn, stop)
            if not (math.isfinite(lv) and math.isfinite(gv)):
                raise self._nonfinite(step, lv, gv, lr)
            opt.step()
            if use_ema:
                with torch.no_grad():
                    if step > self.cfg.ema_start:
                        torch._foreach_lerp_(ema_p, raw_p, 1.0 - ema_decay_at(step))
                    else:
                        torch._foreach_copy_(ema_p, raw_p)
                    if raw_b:
                        torch._foreach_copy_(ema_b, raw_b)
            self.step = step
            acc[0] += lv
            acc[1] += 1
            smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
            if step % log_every == 0:
                self.history.append((step, acc[0] / acc[1]))
                if log is not None:
                    now = time.perf_counter()
                    log.scalars(step, {"loss": acc[0] / acc[1], "lr": lr, "grad_norm": gv,
                                       "ema_decay": ema_decay_at(step) if use_ema else 0.0,
                                       "steps_per_s": (step - clock_step) / max(now - clock, 1e-9)})
                    clock, clock_step = now, step
                acc[0], acc[1] = 0.0, 0
                bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if stopping or (self.world_size == 1 and stop):
                self._checkpoint()
                raise Interrupted(step, steps, self.out)
            if ckpt_every and step % ckpt_every == 0 and step != steps:
                self._checkpoint()
                self._log_samples(log)
        self._checkpoint()
        self._log_samples(log)

    def _result(self) -> TrainResult:
        history = list(self.history)
        if self.loss_acc[1] > 0:
            history.append((self.step, self.loss_acc[0] / self.loss_acc[1]))
        final = history[-1][1] if history else float("nan")
        model = self.ema if self.ema is not None else copy.deepcopy(self.model)
        return TrainResult(run_dir=self.out, model=model.eval(), raw_model=self.model, steps=self.step,
                           final_loss=final, history=history, resumed_from=self.resumed_from,
                           recipe_changes=list(self.recipe_changes))


def train(flow, data, steps: Optional[int] = None, out: Optional[PathLike] = None, **kw: Any) -> TrainResult:
    """Train ``flow`` on ``data`` for ``steps`` steps (resuming from ``out`` if it holds a state);
    ``kw``: :class:`TrainSettings` fields, or ``settings=``, ``extra_config=``, ``allow_recipe_change=``
    and ``desc=`` (see :class:`Trainer`)."""
    return Trainer(flow, data, out, steps, **kw).fit()
