"""Figures people would rather look at than read: scatter panels, image grids, curves.

Matplotlib with the Agg backend (no display needed); every writer creates parent folders.
Image panels are sized from their content (every tile at least ``MIN_TILE_PX`` pixels, the figure
as tall as the grids, so no empty bands); curves take :func:`series_style`, which keeps up to 20
series apart by colour (and the second ten by a dashed line and another marker too).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


DPI = 110
MIN_TILE_PX = 48  # an image tile is drawn at least this many pixels wide
# tab20's strong colours, then its light ones: 20 colours, no two alike among the first ten or the last ten
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#000000",
            "#dbdb8d", "#9edae5")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def series_style(i: int) -> Dict[str, Any]:
    """Line style of the ``i``-th series: a distinct colour for each of the first 20 (then repeating),
    solid for the first ten and dashed after, with a marker that changes too."""
    return {"color": _PALETTE[i % len(_PALETTE)], "ls": "-" if (i // 10) % 2 == 0 else "--",
            "marker": _MARKERS[(i + i // 10) % len(_MARKERS)]}


def save_figure(fig, path, dpi: int = DPI) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
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


def save_image_panels(panels: Sequence[Tuple[str, Tensor]], path, nrow: int = 10, suptitle: str = "",
                      min_tile: int = MIN_TILE_PX) -> Path:
    """One image grid per (title, images) side by side (e.g. the same noise at several NFE).

    The figure is sized from the grids: every tile is drawn at least ``min_tile`` pixels wide (an
    integer upscale, nearest neighbour) and each panel as wide as its grid, so tiny images are
    readable and no empty band surrounds a short grid."""
    plt = pyplot()
    grids = [image_grid(imgs, nrow) for _, imgs in panels]
    side = max(int(torch.as_tensor(imgs).shape[-1]) for _, imgs in panels)
    scale = max(1, math.ceil(min_tile / max(1, side)))
    widths = [g.shape[1] * scale / DPI for g in grids]
    height = max(g.shape[0] for g in grids) * scale / DPI
    title_in = 0.3
    sup_in = 0.35 if suptitle else 0.0
    gap = 0.25
    fig = plt.figure(figsize=(sum(widths) + gap * (len(grids) - 1), height + title_in + sup_in), dpi=DPI)
    left = 0.0
    W, H = sum(widths) + gap * (len(grids) - 1), height + title_in + sup_in
    for (title, _), g, w in zip(panels, grids, widths):
        gh = g.shape[0] * scale / DPI
        ax = fig.add_axes([left / W, (H - sup_in - title_in - gh) / H, w / W, gh / H])
        ax.imshow(g[..., 0] if g.shape[2] == 1 else g, cmap="gray" if g.shape[2] == 1 else None,
                  interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        left += w + gap
    if suptitle:
        fig.suptitle(suptitle, fontsize=10, y=1.0 - 0.05 * sup_in / H)
    return save_figure(fig, path, dpi=DPI)


def _draw_curves(ax, curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                 floor: Optional[float], logx: bool, logy: bool, title: str) -> None:
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        ax.plot(xs, ys, ms=3, label=name, **series_style(i))
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
    ax.legend(fontsize=7 if len(curves) > 8 else 8, ncol=2 if len(curves) > 10 else 1)


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
