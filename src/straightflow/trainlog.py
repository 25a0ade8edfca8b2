"""Training logs: scalars and sample grids of a run, as CSV + PNG, TensorBoard events or W&B.

``TrainSettings(log=...)`` picks the kind (:data:`LOG_KINDS`; ``"csv"`` by default, ``"none"`` for no
logs) and :class:`~straightflow.train.Trainer` writes, for a run with an output directory, into
``RUN/logs/`` (:data:`LOG_DIR`):

- ``scalars.csv`` (every kind): one row every ``log_every`` steps with :data:`COLUMNS`: the mean loss
  since the previous row, the learning rate, the gradient norm (before clipping), the EMA decay of the
  step and the steps per second since the previous row;
- a sample grid at every checkpoint (``ckpt_every`` and the end), for a flow on images (an 8x8 grid
  from fixed noise, Euler 16 steps, labels cycling) or on 2D points (a scatter): ``samples-<step>.png``
  (``csv``), an image summary (``tensorboard``) or a ``wandb.Image`` (``wandb``);
- ``tensorboard``: event files (``torch.utils.tensorboard.SummaryWriter``), so ``tensorboard --logdir
  runs/`` shows every run's curves; ``wandb``: a W&B run in ``RUN/logs/wandb`` (needs ``wandb``
  installed; the command line sets ``WANDB_MODE=offline`` unless the environment says otherwise).

Resuming drops the rows (and, for TensorBoard, the events) written after the checkpoint resumed from,
so an interrupted run's log has each step once. Nothing here reads the environment.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .io import atomic_write_bytes

__all__ = ["LOG_KINDS", "LOG_DIR", "SCALARS_FILE", "COLUMNS", "check_log", "TrainLog", "sample_grid"]

LOG_KINDS = ("csv", "tensorboard", "wandb", "none")
LOG_DIR = "logs"
SCALARS_FILE = "scalars.csv"
COLUMNS = ("step", "loss", "lr", "grad_norm", "ema_decay", "steps_per_s")
GRID_SIDE, GRID_STEPS = 8, 16  # sample grids: 8x8 images (or 1024 points), Euler with 16 steps


def check_log(kind: Any, available: bool = False) -> str:
    """``kind`` checked against :data:`LOG_KINDS`; ``available``: also that its package is installed
    (``tensorboard`` or ``wandb``), else ``ValueError`` saying what to install."""
    if kind not in LOG_KINDS:
        raise ValueError(f"log must be one of {', '.join(LOG_KINDS)}, got {kind!r}")
    if available and kind in ("tensorboard", "wandb"):
        try:
            __import__(kind)
        except ImportError:
            raise ValueError(f"log {kind!r} needs the {kind} package (pip install {kind}); or use log 'csv'") from None
    return str(kind)


def _tile(x: Tensor, side: int) -> np.ndarray:
    """Images ``(N, C, H, W)`` in [-1, 1] -> one ``(side*H, side*W, 3)`` uint8 grid."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(n, 3, h, w)
    grid = torch.zeros((3, side * h, side * w), dtype=torch.uint8)
    for i in range(min(n, side * side)):
        r, q = divmod(i, side)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i, :3]
    return grid.permute(1, 2, 0).numpy()


def _scatter(x: Tensor) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
    p = x.detach().float().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def sample_grid(model: nn.Module, shape, num_classes: Optional[int], device, seed: int = 0) -> Optional[np.ndarray]:
    """An ``(H, W, 3)`` uint8 picture of ``model``'s samples (a velocity model): an 8x8 grid for images
    ``(C, H, W)`` with 1 or 3 channels, a scatter of 1024 points for 2D data, else None. Fixed noise
    (``seed``), Euler with 16 steps, labels cycling through the classes."""
    from .solvers import sample

    shape = tuple(int(s) for s in shape)
    images = len(shape) == 3 and shape[0] in (1, 3)
    if not (images or shape == (2,)):
        return None
    n = GRID_SIDE * GRID_SIDE if images else 1024
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    cond = {"y": (torch.arange(n) % num_classes).to(device)} if num_classes else None
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = sample(model, noise, solver="euler", steps=GRID_STEPS, cond=cond).x
    finally:
        model.train(was)
    return _tile(x, GRID_SIDE) if images else _scatter(x)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class TrainLog:
    """The log of one training run in ``run_dir/logs`` (see the module docstring); ``start_step``: the
    step training starts (or resumes) from, after which earlier logs are dropped."""

    def __init__(self, kind: str, run_dir: Path, start_step: int = 0, config: Optional[Mapping[str, Any]] = None,
                 name: Optional[str] = None) -> None:
        self.kind = check_log(kind, available=True)
        self.dir = Path(run_dir) / LOG_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / SCALARS_FILE
        self._keep_rows_up_to(int(start_step))
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if self._file.tell() == 0:
            self._csv.writerow(COLUMNS)
            self._file.flush()
        self._tb = self._wandb = None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir), purge_step=int(start_step) + 1 if start_step else None)
        elif self.kind == "wandb":
            import wandb

            run_id = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb.init(project="straightflow", name=name or Path(run_dir).name, id=run_id,
                                     resume="allow", dir=str(self.dir), config=dict(config or {}))

    def _keep_rows_up_to(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or tuple(rows[0]) != COLUMNS:
            raise ValueError(f"{self.path} is not a straightflow scalar log (columns {', '.join(COLUMNS)}); "
                             "move it away to log this run")
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        if len(keep) != len(rows):
            buf = io.StringIO()
            csv.writer(buf).writerows(keep)
            atomic_write_bytes(self.path, buf.getvalue().encode())

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        """One row of :data:`COLUMNS` (missing values empty) and the same scalars to TensorBoard / W&B."""
        self._csv.writerow([step] + [("" if values.get(k) is None else f"{values[k]:.6g}") for k in COLUMNS[1:]])
        self._file.flush()
        finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        if self._tb is not None:
            for k, v in finite.items():
                self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in finite.items()}, step=step)

    def image(self, step: int, img: np.ndarray, tag: str = "samples") -> None:
        """An ``(H, W, 3)`` uint8 picture: a PNG in the log folder (csv), an image summary or a W&B image."""
        if self._tb is not None:
            self._tb.add_image(tag, img, step, dataformats="HWC")
            self._tb.flush()
        elif self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(img)}, step=step)
        else:
            atomic_write_bytes(self.dir / f"{tag}-{step:07d}.png", _png(img))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
