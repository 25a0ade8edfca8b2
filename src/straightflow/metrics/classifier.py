"""The project's digit classifier: architecture, training recipe, on-disk cache, feature extractor.

Inception-FID does not apply to 8x8 digits and its weights cannot be downloaded here, so the
project trains its own small CNN (:class:`DigitClassifier`) with the recipe in
:func:`train_classifier`; :func:`feature_extractor` returns a trained one whose
penultimate-layer features feed the Fréchet distance (:mod:`.frechet`). Weights are cached
at ``$STRAIGHTFLOW_CACHE/classifiers/<name>-<RECIPE_VERSION>.safetensors`` (default cache
``~/.cache/straightflow``), with a JSON beside them holding the held-out accuracy; they are
trained on first use (a few seconds on 2 CPU cores) and loaded afterwards. A cached file is
reused only while its fingerprint -- SHA-256 over the training images, labels, recipe, seed
and ``RECIPE_VERSION`` -- matches the request.

Process-wide state lives here and only here: ``_MEMO`` (loaded classifiers by
``(cache path, fingerprint)``) and ``_TRAIN_CALLS`` (trainings so far in this process; read
it as ``straightflow.metrics._TRAIN_CALLS``, which always shows the live value).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .. import io
from .arrays import ArrayLike

RECIPE_VERSION = "v1"
"""Bump when the architecture or the training recipe changes: the cache file name carries it."""

# The training recipes, by extractor name. ``image_size``: training resolution; ``shift``:
# max random translation in pixels (at that resolution); ``zoom``: range of random scale.
_RECIPES: Dict[str, Dict[str, Any]] = {
    "digits": dict(image_size=8, steps=600, batch_size=64, lr=3e-3, weight_decay=1e-4,
                   shift=1.0, zoom=(1.0, 1.0)),
    "mnist": dict(image_size=28, steps=800, batch_size=64, lr=3e-3, weight_decay=1e-4,
                  shift=3.0, zoom=(0.7, 1.05)),
    "custom": dict(image_size=None, steps=600, batch_size=64, lr=3e-3, weight_decay=1e-4,
                   shift=1.0, zoom=(1.0, 1.0)),
}


class DigitClassifier(nn.Module):
    """Small CNN for 1-channel images in ``[-1, 1]`` of any size >= 8.

    ``conv3x3(1->32)`` at the input resolution, adaptive average pooling to 8x8,
    ``conv3x3(32->32)``, average pooling to 4x4, ``conv3x3(32->64)``, flatten (1024),
    ``linear(1024->128)`` = the features, ``linear(128->n_classes)`` = the logits. All
    activations are ReLU. 8x8 digits and 28x28 MNIST go through the same network.
    """

    feature_dim = 128

    def __init__(self, n_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, n_classes)

    def features(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < 8:
            raise ValueError(
                f"DigitClassifier expects (N, {self.in_channels}, H, W) images with H, W >= 8, "
                f"got shape {tuple(x.shape)}"
            )
        h = F.relu(self.conv1(x))
        h = F.adaptive_avg_pool2d(h, 8)
        h = F.relu(self.conv2(h))
        h = F.avg_pool2d(h, 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_digits_images(size: int = 8) -> Tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as float32 ``(1797, 1, size, size)`` in ``[-1, 1]``.

    ``size != 8`` upsamples with bilinear interpolation. Returns ``(images, labels)``.
    """
    from sklearn.datasets import load_digits  # heavy (scikit-learn): imported on first use

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(-1, 1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def _augment(x: Tensor, gen: torch.Generator, shift: float, zoom: Tuple[float, float]) -> Tensor:
    """Random translation (uniform in ±shift pixels) and zoom, background -1 outside."""
    n, _, h, w = x.shape
    z = torch.empty(n).uniform_(zoom[0], zoom[1], generator=gen)
    sx = torch.empty(n).uniform_(-shift, shift, generator=gen)
    sy = torch.empty(n).uniform_(-shift, shift, generator=gen)
    if shift >= 1 and zoom == (1.0, 1.0):
        sx, sy = sx.round(), sy.round()  # whole-pixel shifts stay exact (no blur)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / z
    theta[:, 1, 1] = 1.0 / z
    theta[:, 0, 2] = -2.0 * sx / w  # normalised coordinates, align_corners=False
    theta[:, 1, 2] = -2.0 * sy / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample (x + 1) with zero padding so that outside the image reads as -1 (background)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


_TRAIN_CALLS = 0  # counts trainings in this process (the tests use it to check the cache)


def train_classifier(
    x: Tensor,
    y: Tensor,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    shift: float = 1.0,
    zoom: Tuple[float, float] = (1.0, 1.0),
    n_classes: Optional[int] = None,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``x`` (N, 1, H, W) in [-1, 1] and labels ``y`` (N,).

    The recipe: AdamW (``lr``, ``weight_decay``), cosine learning-rate decay to 0 over
    ``steps`` minibatches of ``batch_size`` drawn with replacement-free epochs, random
    translations of up to ``shift`` pixels (whole pixels when there is no zoom) and random
    zoom in ``zoom`` (background -1). Deterministic given ``seed``: the weights are
    initialised under a forked, seeded RNG and every random draw uses a local generator; the
    global RNG and thread settings are left alone. Returns the model in eval mode.
    """
    global _TRAIN_CALLS
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be (N, 1, H, W) images, got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be (N,) labels matching x, got shape {tuple(y.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(n_classes=n_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    perm = torch.randperm(x.shape[0], generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > x.shape[0]:
            perm, pos = torch.randperm(x.shape[0], generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        xb = _augment(x[idx], gen, shift, zoom)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _TRAIN_CALLS += 1
    return model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def _split(n: int, seed: int, held_out: float = 0.2) -> Tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    k = max(1, int(round(n * held_out)))
    return perm[k:], perm[:k]


def _cache_root() -> Path:
    return Path(os.environ.get("STRAIGHTFLOW_CACHE") or "~/.cache/straightflow").expanduser()


def classifier_cache_path(name: str) -> Path:
    """Where ``feature_extractor(name)`` keeps its weights (``.json`` beside it)."""
    return _cache_root() / "classifiers" / f"{name}-{RECIPE_VERSION}.safetensors"


def _fingerprint(x: Tensor, y: Tensor, recipe: Dict[str, Any], seed: int) -> str:
    h = hashlib.sha256()
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    h.update(repr(sorted(recipe.items())).encode())
    h.update(f"seed={seed};{RECIPE_VERSION}".encode())
    return h.hexdigest()[:16]


_MEMO: Dict[Tuple[str, str], DigitClassifier] = {}


def _load_cached(path: Path, expect_fingerprint: Optional[str]) -> Optional[DigitClassifier]:
    """Weights from the cache; ``None`` if their fingerprint differs from the expected one."""
    tensors = io.load_tensors(path)  # clear errors for missing/truncated/pickle files
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if expect_fingerprint is not None and meta.get("fingerprint") != expect_fingerprint:
        return None
    model = DigitClassifier(n_classes=int(meta["n_classes"]))
    model.load_state_dict(tensors, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def feature_extractor(
    name: str = "digits",
    x: Optional[ArrayLike] = None,
    y: Optional[ArrayLike] = None,
    seed: int = 0,
    steps: Optional[int] = None,
) -> DigitClassifier:
    """A trained :class:`DigitClassifier` in eval mode, trained once and cached.

    - ``"digits"``: scikit-learn's bundled 8x8 digits (scaled to ``[-1, 1]``), 80/20 seeded
      split, random ±1 pixel shifts.
    - ``"mnist"``: a *proxy* for MNIST. The shipped MNIST split has no labels, so the
      classifier is trained on the same digits upsampled to 28x28 (bilinear) with random
      shifts (±3 px) and zooms (0.7-1.05, MNIST digits fill ~20 of 28 pixels). Its features
      are meaningful for 28x28 handwritten digits, but it is not an MNIST-trained network.
    - any other name with ``x`` (N, 1, H, W) in [-1, 1] and integer labels ``y``: your data,
      same recipe as digits (80/20 split). Later, ``feature_extractor(name)`` alone loads
      that cached classifier.

    Weights go to ``$STRAIGHTFLOW_CACHE/classifiers/<name>-<RECIPE_VERSION>.safetensors``
    (atomic write; default cache ``~/.cache/straightflow``) with ``<...>.json`` holding the
    held-out accuracy; later calls load them (and keep them in an in-process memo). A cached
    file whose data/recipe fingerprint does not match, or that is corrupt, is retrained.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"extractor name must be a plain file-name-safe string, got {name!r}")
    if (x is None) != (y is None):
        raise ValueError("give both x and y (images and labels) or neither")
    if x is None:
        if name not in ("digits", "mnist"):
            path = classifier_cache_path(name)
            if path.is_file():  # a custom extractor trained earlier: load it as it is
                key = (str(path), "as-cached")
                if key not in _MEMO:
                    _MEMO[key] = _load_cached(path, expect_fingerprint=None)
                return _MEMO[key]
            raise ValueError(
                f"unknown built-in extractor {name!r}; built-ins: 'digits', 'mnist' "
                f"(or pass x=images, y=labels to train one on your data; no cache at {path})"
            )
        recipe = dict(_RECIPES[name])
        xt, yt = load_digits_images(recipe["image_size"])
    else:
        if name in ("digits", "mnist"):
            raise ValueError(f"{name!r} is a built-in extractor; give your data set another name")
        recipe = dict(_RECIPES["custom"])
        xt = torch.as_tensor(x).detach().to("cpu", torch.float32)
        if xt.ndim == 3:
            xt = xt.unsqueeze(1)
        yt = torch.as_tensor(y).detach().to("cpu").long().reshape(-1)
        recipe["image_size"] = list(xt.shape[-2:])
    if steps is not None:
        recipe["steps"] = int(steps)
    fp = _fingerprint(xt, yt, recipe, seed)
    path = classifier_cache_path(name)
    key = (str(path), fp)
    if key in _MEMO:
        return _MEMO[key]
    n_classes = int(yt.max()) + 1
    model: Optional[DigitClassifier] = None
    if path.is_file():
        try:
            model = _load_cached(path, expect_fingerprint=fp)
        except Exception as e:  # corrupt/incompatible cache: retrain and overwrite
            warnings.warn(f"ignoring unusable classifier cache {path}: {e}")
    if model is None:
        tr, ho = _split(xt.shape[0], seed)
        t0 = time.perf_counter()
        model = train_classifier(
            xt[tr], yt[tr], steps=recipe["steps"], seed=seed, batch_size=recipe["batch_size"],
            lr=recipe["lr"], weight_decay=recipe["weight_decay"], shift=recipe["shift"],
            zoom=tuple(recipe["zoom"]), n_classes=n_classes,
        )
        seconds = time.perf_counter() - t0
        info = {
            "name": name,
            "recipe_version": RECIPE_VERSION,
            "recipe": recipe,
            "seed": seed,
            "fingerprint": fp,
            "n_classes": n_classes,
            "n_train": int(tr.numel()),
            "n_held_out": int(ho.numel()),
            "train_accuracy": _accuracy(model, xt[tr], yt[tr]),
            "held_out_accuracy": _accuracy(model, xt[ho], yt[ho]),
            "train_seconds": round(seconds, 2),
        }
        if name == "mnist":
            info["note"] = "proxy: trained on sklearn digits upsampled to 28x28 (MNIST ships no labels)"
        io.save_tensors(path, model.state_dict(),
                        metadata={"fingerprint": fp, "n_classes": str(n_classes),
                                  "recipe_version": RECIPE_VERSION, "name": name})
        io.save_json(path.with_suffix(".json"), info)
    for p in model.parameters():
        p.requires_grad_(False)
    _MEMO[key] = model
    return model
