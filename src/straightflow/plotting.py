"""Figures people would rather look at than read: scatter panels, image grids, curves.

Matplotlib with the Agg backend (no display needed); every writer creates parent folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def image_grid(x: Tensor, nrow: int = 10, pad: int = 1) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` in [-1, 1] into one uint8 array ``(H', W', C)``."""
    x = torch.as_tensor(x).detach().float().cpu().clamp(-1, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nr = (n + ncol - 1) // ncol
    out = torch.ones(c, nr * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = ((out + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return arr


def save_image_grid(x: Tensor, path, nrow: int = 10, scale: int = 4) -> Path:
    """Write a PNG grid of images (nearest-neighbour upscaled by ``scale`` for tiny images)."""
    from PIL import Image

    arr = image_grid(x, nrow)
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_scatter_panels(panels: Sequence[Tuple[str, Tensor]], path, reference: Optional[Tensor] = None,
                        lim: float = 4.5, suptitle: str = "") -> Path:
    """One scatter panel per (title, points (N, 2)), the reference data in the first panel."""
    plt = pyplot()
    items = ([("data", reference)] if reference is not None else []) + list(panels)
    fig, axes = plt.subplots(1, len(items), figsize=(2.6 * len(items), 2.8), squeeze=False)
    for ax, (title, pts) in zip(axes[0], items):
        p = torch.as_tensor(pts).detach().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5, color="tab:gray" if title == "data" else "tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return save_figure(fig, path)


def save_image_panels(panels: Sequence[Tuple[str, Tensor]], path, nrow: int = 10, suptitle: str = "") -> Path:
    """One image grid per (title, images) side by side (e.g. the same noise at several NFE)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.0), squeeze=False)
    for ax, (title, imgs) in zip(axes[0], panels):
        arr = image_grid(imgs, nrow)
        ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None,
                  interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return save_figure(fig, path)


def _draw_curves(ax, curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                 floor: Optional[float], logx: bool, logy: bool, title: str) -> None:
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label="data-vs-data floor")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def save_curves(curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], path, xlabel: str, ylabel: str,
                floor: Optional[float] = None, logx: bool = True, logy: bool = True, title: str = "") -> Path:
    """Line plot of named (x, y) series; an optional horizontal floor line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    _draw_curves(ax, curves, xlabel, ylabel, floor, logx, logy, title)
    return save_figure(fig, path)


def save_curve_panels(panels: Dict[str, Dict[str, Tuple[Sequence[float], Sequence[float]]]], path, xlabel: str,
                      ylabel: str, logx: bool = True, logy: bool = False, suptitle: str = "") -> Path:
    """One :func:`save_curves`-style panel per entry of ``panels`` (title -> named series), in a row."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        _draw_curves(ax, curves, xlabel, ylabel, None, logx, logy, title)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
