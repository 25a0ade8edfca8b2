"""Input clips for streaming: a built-in synthetic clip (moving shapes, or morphing digits) with
static stretches, or a folder of images.

Frames are float tensors ``(C, H, W)`` in ``[-1, 1]`` (the data range of straightflow's image
data sets). The built-in clip alternates ``move`` frames of motion with ``hold`` frames where
nothing changes (so the similarity filter has something to skip), and is deterministic in ``seed``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["builtin_clip", "load_clip", "load_image_folder", "frames_to_uint8", "IMAGE_SUFFIXES", "static_mask"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _motion_schedule(n_frames: int, move: int, hold: int) -> np.ndarray:
    """Phase (cumulative motion) per frame: advances by 1 during ``move`` frames, frozen during ``hold``."""
    phase, p = np.zeros(n_frames), 0.0
    for i in range(n_frames):
        if i and (i - 1) % (move + hold) < move:
            p += 1.0
        phase[i] = p
    return phase


def static_mask(n_frames: int, move: int = 24, hold: int = 16) -> np.ndarray:
    """True where a built-in clip frame equals its predecessor (inside a static stretch)."""
    ph = _motion_schedule(n_frames, move, hold)
    return np.concatenate([[False], ph[1:] == ph[:-1]])


def _render_shapes(phase: float, res: int, channels: int, speed: float, ss: int = 4) -> Tensor:
    big = res * ss
    yy, xx = torch.meshgrid(torch.arange(big, dtype=torch.float64) + 0.5, torch.arange(big, dtype=torch.float64) + 0.5,
                            indexing="ij")
    yy, xx = yy / big, xx / big
    img = torch.zeros(big, big, dtype=torch.float64)
    a = speed * phase
    # a disc on a Lissajous path and a square sliding back and forth
    cx, cy = 0.5 + 0.28 * math.cos(a), 0.5 + 0.28 * math.sin(2 * a)
    img = torch.maximum(img, ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.17 ** 2).double())
    sx = 0.5 + 0.3 * math.sin(0.7 * a + 1.0)
    img = torch.maximum(img, 0.6 * (((xx - sx).abs() < 0.11) & ((yy - 0.78).abs() < 0.11)).double())
    img = F.avg_pool2d(img[None, None], ss)[0, 0]
    out = img.expand(channels, res, res).clone()
    if channels == 3:  # tint the shapes so colour models see colour
        out = out * torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64).view(3, 1, 1)
    return out * 2.0 - 1.0


def _digit_frames(phase: np.ndarray, res: int, channels: int, seed: int, period: float = 8.0) -> List[Tensor]:
    from ..data import digits

    ds = digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds.x))
    imgs = ds.x[torch.as_tensor(order[: int(phase.max() // period) + 2])].double()  # (K, 1, 8, 8)
    if imgs.shape[-1] != res:
        imgs = F.interpolate(imgs, size=(res, res), mode="bilinear", align_corners=False)
    frames = []
    for p in phase:
        k, a = int(p // period), (p % period) / period
        f = (1 - a) * imgs[k] + a * imgs[k + 1]
        frames.append(f.expand(channels, res, res).clone())
    return frames


def builtin_clip(n_frames: int = 120, resolution: int = 8, channels: int = 1, kind: str = "shapes", seed: int = 0,
                 move: int = 24, hold: int = 16, speed: float = 0.15, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(n_frames, C, R, R)`` in ``[-1, 1]``: ``kind="shapes"`` (a disc and a square moving) or ``"digits"`` (digits morphing)."""
    if n_frames < 1 or resolution < 1 or channels not in (1, 3):
        raise ValueError(f"builtin_clip needs n_frames >= 1, resolution >= 1, channels 1 or 3; got {n_frames}, {resolution}, {channels}")
    phase = _motion_schedule(n_frames, move, hold)
    if kind == "shapes":
        frames = [_render_shapes(float(p), resolution, channels, speed) for p in phase]
    elif kind == "digits":
        frames = _digit_frames(phase, resolution, channels, seed)
    else:
        raise ValueError(f"unknown built-in clip {kind!r}; valid: shapes, digits")
    return torch.stack(frames).to(dtype)


def load_image_folder(path: str, resolution: int, channels: int = 1, limit: Optional[int] = None) -> Tensor:
    """Images of a folder (sorted by name) as ``(N, C, R, R)`` in ``[-1, 1]``, resized to ``R x R``."""
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"clip folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"clip folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:limit] if limit else files
    out = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((resolution, resolution), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(a[None] if channels == 1 else a.transpose(2, 0, 1).copy()))
    return torch.stack(out)


def load_clip(spec: str, resolution: int, channels: int = 1, n_frames: int = 120, seed: int = 0) -> Tensor:
    """``builtin`` / ``builtin:shapes`` / ``builtin:digits`` or a folder of images."""
    if spec.startswith("builtin"):
        kind = spec.split(":", 1)[1] if ":" in spec else "shapes"
        return builtin_clip(n_frames, resolution, channels, kind=kind, seed=seed)
    return load_image_folder(spec, resolution, channels, limit=n_frames or None)


def frames_to_uint8(x: Tensor) -> np.ndarray:
    """``(C, H, W)`` in [-1, 1] -> ``(H, W)`` or ``(H, W, 3)`` uint8."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
