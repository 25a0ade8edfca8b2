"""Latent flow matching (Dao et al. 2023, "Flow Matching in Latent Space").

1. :func:`train_autoencoder` trains a convolutional :class:`~straightflow.models.Autoencoder` on the
   images with the project's :class:`~straightflow.train.Trainer` (atomic checkpoints, exact
   resume, EMA), then fits the per-channel latent normalisation (``z = (enc(x) - shift) / scale``)
   and rewrites the run directory with it.
2. The data set is encoded once (deterministic encoder; with ``hflip`` the mirrored images too).
3. A velocity model (DiT or UNet) is trained by flow matching on the latents, in the same way as
   a pixel model (``straightflow.train``).
4. :class:`LatentFlow` samples latents with any registered solver and decodes them; its ``nfe``
   counts velocity evaluations of the latent model (the single decoder pass is reported apart).

Run directory written by :func:`train_latent_flow`::

    out/
      model.safetensors, config.json, train_state.safetensors   latent velocity model
      autoencoder/model.safetensors, config.json, train_state.safetensors

``config.json`` has a ``"latent"`` section (``{"autoencoder": "autoencoder", "pixel_shape": [...],
...}``) that :func:`load_latent` (and ``straightflow generate``) use to find the autoencoder.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import checkpoint
from ..data import Dataset, load_dataset, random_hflip
from ..flow import Flow
from ..models import Autoencoder, build_model
from ..solvers import SampleResult, sample
from ..train import TrainResult, TrainSettings, train

__all__ = [
    "AutoencoderObjective", "HFlipFlow", "LatentFlow", "LatentTrainResult", "train_autoencoder",
    "encode_dataset", "default_latent_model", "default_pixel_model", "train_latent_flow", "load_latent",
    "is_latent_run", "AE_DIR",
]

AE_DIR = "autoencoder"
PathLike = Union[str, Path]


FLOW_WARMUP = 100  # learning-rate warm-up steps of the latent flow stage (straightflow latent has no flag for it)


def _as_dataset(data: Union[str, Path, Dataset, Tensor], n: Optional[int] = None, seed: int = 0) -> Dataset:
    """A Dataset as given, or a named set / file loaded on its training split (the rest is held out)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Tensor):
        return Dataset(data, name="tensor")
    return load_dataset(data, n=n, seed=seed, split="train")


def _source(data: Any, ds: Dataset) -> Dict[str, Any]:
    """``data_source`` (and ``data_split`` for a named set or file) for a run's config."""
    if isinstance(data, (str, os.PathLike)):
        return {"data_source": str(data), "data_split": "train"}
    return {"data_source": ds.name}


def _check_images(ds: Dataset) -> None:
    if not ds.is_image:
        raise ValueError(f"{ds.name}: latent flows need images (N, C, H, W); got samples of shape {ds.shape}")
    if ds.shape[1] != ds.shape[2]:
        raise ValueError(f"{ds.name}: square images expected, got {ds.shape[1]}x{ds.shape[2]}")


# ----------------------------------------------------------------------------- objectives


class AutoencoderObjective:
    """Trainer objective for an autoencoder: ``loss = MSE(dec(enc(x)), x) + penalty * mean(z^2)``.

    Duck-types :class:`~straightflow.flow.Flow` for the Trainer (``model``, ``loss``, ``config``,
    ``coupling``). ``hflip``: mirror each training image with probability 1/2 first.
    """

    def __init__(self, model: Autoencoder, hflip: bool = False) -> None:
        if not isinstance(model, Autoencoder):
            raise TypeError(f"AutoencoderObjective needs an Autoencoder, got {type(model).__name__}")
        self.model = model
        self.hflip = bool(hflip)
        self.coupling = SimpleNamespace(name="none", needs_pairs=False)

    def config(self) -> Dict[str, Any]:
        return {"objective": "autoencoder", "loss": "mse", "latent_penalty": self.model.latent_penalty,
                "hflip": self.hflip}

    def loss(self, x1: Tensor, cond=None, x0=None, generator=None, model=None) -> Tensor:
        if self.hflip:
            x1 = random_hflip(x1, generator=generator)
        return checkpoint.unwrap(model if model is not None else self.model).loss(x1)


class HFlipFlow(Flow):
    """:class:`~straightflow.flow.Flow` whose data minibatch is mirrored left-right with probability
    1/2 per image (valid only for mirror-invariant data, see ``straightflow.data.FLIP_SAFE``)."""

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "hflip": True}

    def loss(self, x1: Tensor, cond=None, x0=None, generator=None, model=None) -> Tensor:
        return super().loss(random_hflip(x1, generator=generator), cond=cond, x0=x0, generator=generator, model=model)


# ----------------------------------------------------------------------------- autoencoder


def _auto_mults(resolution: int) -> Tuple[int, ...]:
    if resolution % 4 == 0 and resolution >= 16:
        return (1, 2, 2)
    if resolution % 2 == 0:
        return (1, 2)
    return (1,)


@torch.no_grad()
def _recon_stats(ae: Autoencoder, x: Tensor, batch: int = 512) -> Dict[str, float]:
    from ..metrics import psnr

    rec = torch.cat([ae(x[i:i + batch]).clamp(-1, 1) for i in range(0, x.shape[0], batch)])
    return {"mse": float(torch.mean((rec - x) ** 2)), "psnr": float(psnr(rec, x))}


def train_autoencoder(
    data: Union[str, Path, Dataset, Tensor],
    out: Optional[PathLike],
    steps: int,
    *,
    base_channels: int = 32,
    channel_mults: Optional[Tuple[int, ...]] = None,
    latent_channels: int = 4,
    num_res_blocks: int = 1,
    latent_penalty: float = 1e-4,
    batch_size: int = 128,
    lr: float = 2e-3,
    warmup: int = 50,
    ema_decay: float = 0.0,
    grad_clip: float = 1.0,
    hflip: bool = False,
    seed: int = 0,
    ckpt_every: int = 500,
    device: str = "cpu",
    progress: bool = True,
    n: Optional[int] = None,
    allow_recipe_change: bool = False,
) -> Tuple[Autoencoder, TrainResult]:
    """Train an autoencoder on images and fit its latent normalisation; returns ``(ae, result)``.

    ``out`` (or None for in-memory) becomes a run directory loadable with ``straightflow.load``;
    re-running with the same ``out`` resumes from its ``train_state.safetensors``. The config's
    ``"autoencoder"`` section records the reconstruction MSE/PSNR on (up to 2000) training images.
    ``channel_mults`` default: downsample x4 when the resolution allows (28 -> 7, 32 -> 8).
    """
    ds = _as_dataset(data, n=n, seed=seed)
    _check_images(ds)
    c, r, _ = ds.shape
    ae = build_model({"name": "autoencoder", "in_channels": c, "resolution": r, "base_channels": base_channels,
                      "channel_mults": list(channel_mults or _auto_mults(r)), "num_res_blocks": num_res_blocks,
                      "latent_channels": latent_channels, "latent_penalty": latent_penalty}, seed=seed)
    obj = AutoencoderObjective(ae, hflip=hflip)
    res = train(obj, ds.x, steps, out=out, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                grad_clip=grad_clip, seed=seed, ckpt_every=ckpt_every, device=device, progress=progress,
                extra_config=_source(data, ds), desc="autoencoder", allow_recipe_change=allow_recipe_change)
    trained = res.model.eval()
    x = ds.x.to(next(trained.parameters()).device)
    trained.fit_latent_stats(x)
    stats = _recon_stats(trained, x[:2000])
    if out is not None:
        cfg = checkpoint.load_config(out)
        cfg.pop("model", None)
        cfg["autoencoder"] = {**stats, "latent_shape": list(trained.latent_shape)}
        checkpoint.save_model(out, trained, cfg)
    trained.recon = stats
    return trained, res


@torch.no_grad()
def encode_dataset(ae: Autoencoder, ds: Dataset, hflip: bool = False, batch: int = 512) -> Dataset:
    """Normalised latents of every image (and of its mirror image with ``hflip``), labels kept."""
    dev = next(ae.parameters()).device
    xs = [ds.x] + ([ds.x.flip(-1)] if hflip else [])
    z = torch.cat([torch.cat([ae.encode(x[i:i + batch].to(dev)).cpu() for i in range(0, x.shape[0], batch)])
                   for x in xs])
    y = None if ds.y is None else ds.y.repeat(len(xs))
    return Dataset(z, y, ds.num_classes if ds.y is not None else None, f"{ds.name}-latent")


# ----------------------------------------------------------------------------- model defaults


def default_latent_model(latent_shape, num_classes: Optional[int], kind: str = "dit", width: int = 128,
                         depth: int = 4) -> Dict[str, Any]:
    """Velocity-model config for latents ``(C, r, r)``: a DiT with 1x1 patches (r <= 8) or 2x2, or a
    one/two-level UNet."""
    c, r, _ = (int(v) for v in latent_shape)
    if kind == "dit":
        patch = 1 if r <= 8 or r % 2 else 2
        return {"name": "dit", "in_channels": c, "resolution": r, "patch_size": patch, "hidden": width,
                "depth": depth, "heads": max(1, width // 32), "num_classes": num_classes}
    if kind == "unet":
        return {"name": "unet", "in_channels": c, "resolution": r, "base_channels": width // 2,
                "channel_mults": [1, 2] if r % 2 == 0 else [1], "num_classes": num_classes}
    raise ValueError(f"unknown latent model kind {kind!r}; valid: dit, unet")


def default_pixel_model(shape, num_classes: Optional[int], kind: str = "unet", width: int = 32,
                        depth: int = 4) -> Dict[str, Any]:
    """Velocity-model config for pixel images ``(C, R, R)``: UNet (``width`` base channels, 3 levels
    when ``R % 4 == 0``) or DiT (patch 4 for R >= 28, else 2; ``width`` hidden)."""
    c, r, _ = (int(v) for v in shape)
    if kind == "unet":
        mults = [1, 2, 2] if (r % 4 == 0 and r >= 16) else ([1, 2] if r % 2 == 0 else [1])
        return {"name": "unet", "in_channels": c, "resolution": r, "base_channels": width, "channel_mults": mults,
                "num_classes": num_classes}
    if kind == "dit":
        patch = 4 if (r >= 28 and r % 4 == 0) else (2 if r % 2 == 0 else 1)
        return {"name": "dit", "in_channels": c, "resolution": r, "patch_size": patch, "hidden": width,
                "depth": depth, "heads": max(1, width // 32), "num_classes": num_classes}
    raise ValueError(f"unknown pixel model kind {kind!r}; valid: unet, dit")


# ----------------------------------------------------------------------------- latent flow


class LatentFlow:
    """A latent velocity model + its autoencoder: ``sample`` integrates in latent space, then decodes.

    ``model(z, t, **cond)`` is the latent velocity; ``num_classes``/``null_class`` are the model's.
    """

    def __init__(self, model: nn.Module, autoencoder: Autoencoder) -> None:
        if tuple(getattr(model, "sample_shape", autoencoder.latent_shape)) != tuple(autoencoder.latent_shape):
            raise ValueError(f"latent model works on {tuple(model.sample_shape)} but the autoencoder's latents "
                             f"are {tuple(autoencoder.latent_shape)}")
        self.model, self.autoencoder = model, autoencoder
        self.latent_shape = tuple(autoencoder.latent_shape)
        self.sample_shape = tuple(autoencoder.sample_shape)
        self.num_classes = getattr(model, "num_classes", None)
        self.null_class = getattr(model, "null_class", None)
        self.run_config: Dict[str, Any] = getattr(model, "run_config", {})

    def to(self, device) -> "LatentFlow":
        self.model.to(device)
        self.autoencoder.to(device)
        return self

    def eval(self) -> "LatentFlow":
        self.model.eval()
        self.autoencoder.eval()
        return self

    @torch.no_grad()
    def encode(self, x: Tensor, batch: int = 512) -> Tensor:
        return torch.cat([self.autoencoder.encode(x[i:i + batch]) for i in range(0, x.shape[0], batch)])

    @torch.no_grad()
    def decode(self, z: Tensor, batch: int = 512) -> Tensor:
        """Pixels in [-1, 1] (clamped) from normalised latents."""
        return torch.cat([self.autoencoder.decode(z[i:i + batch]).clamp(-1, 1) for i in range(0, z.shape[0], batch)])

    @torch.no_grad()
    def sample(self, n_or_noise: Union[int, Tensor], solver: str = "euler", steps: Optional[int] = 8,
               seed: Optional[int] = None, **kwargs: Any) -> SampleResult:
        """``straightflow.sample`` on the latent model (every option passes through), then decode.

        ``n_or_noise``: a count or latent noise ``(B, *latent_shape)``. ``.x`` holds pixels,
        ``.info["latent"]`` the latents; ``.nfe`` counts latent velocity evaluations only.
        """
        noise = (n_or_noise, *self.latent_shape) if isinstance(n_or_noise, int) else n_or_noise
        r = sample(self.model, noise, solver=solver, steps=steps, seed=seed, **kwargs)
        info = {**r.info, "latent": r.x, "decoder_calls": 1, "space": "latent"}
        return SampleResult(x=self.decode(r.x), nfe=r.nfe, times=r.times, trajectory=r.trajectory, info=info)


def is_latent_run(run_dir: PathLike) -> bool:
    """True if ``run_dir/config.json`` describes a latent flow (has a ``"latent"`` section)."""
    try:
        return "latent" in checkpoint.load_config(run_dir)
    except checkpoint.CheckpointError:
        return False


def load_latent(run_dir: PathLike, device: str = "cpu") -> LatentFlow:
    """Reload a :func:`train_latent_flow` run: the latent model and its autoencoder (eval mode)."""
    run_dir = Path(run_dir)
    cfg = checkpoint.load_config(run_dir)
    lat = cfg.get("latent")
    if not isinstance(lat, dict):
        raise checkpoint.CheckpointError(f"{run_dir}/config.json has no 'latent' section: not a latent-flow run "
                                         "(load pixel runs with straightflow.load)")
    ae_dir = run_dir / str(lat.get("autoencoder", AE_DIR))
    ae = checkpoint.load(ae_dir, device=device)
    if not isinstance(ae, Autoencoder):
        raise checkpoint.CheckpointError(f"{ae_dir}: holds a {type(ae).__name__}, not an autoencoder")
    if ae.config.get("latent_scale") is None:
        raise checkpoint.CheckpointError(f"{ae_dir}: the autoencoder has no latent normalisation (training did "
                                         "not finish); re-run train_latent_flow with the same output to resume")
    model = checkpoint.load(run_dir, device=device)
    return LatentFlow(model, ae).eval()


@dataclass
class LatentTrainResult:
    flow: LatentFlow
    run_dir: Optional[Path]
    autoencoder_result: TrainResult
    flow_result: TrainResult
    seconds: Dict[str, float] = field(default_factory=dict)


def train_latent_flow(
    data: Union[str, Path, Dataset, Tensor],
    out: Optional[PathLike],
    ae_steps: int,
    flow_steps: int,
    *,
    model: Union[str, Dict[str, Any]] = "dit",
    conditional: bool = True,
    width: int = 128,
    depth: int = 4,
    ae_kwargs: Optional[Dict[str, Any]] = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int = FLOW_WARMUP,
    ema_decay: float = 0.999,
    time_dist: str = "uniform",
    cond_dropout: Optional[float] = None,
    hflip: bool = False,
    seed: int = 0,
    ckpt_every: int = 500,
    device: str = "cpu",
    progress: bool = True,
    n: Optional[int] = None,
    allow_recipe_change: bool = False,
    settings: Optional[TrainSettings] = None,
) -> LatentTrainResult:
    """Train the autoencoder (``ae_steps``), encode the data, train a latent flow (``flow_steps``).

    ``model``: ``"dit"``/``"unet"`` (defaults from :func:`default_latent_model`) or a full model
    config for the latents. ``out`` is one run directory holding both (see the module docstring);
    re-running with the same ``out`` resumes whichever stage was interrupted. ``settings``: the latent
    flow's training settings as one value (a :class:`~straightflow.train.TrainSettings`), replacing
    ``flow_steps``, ``batch_size``, ``lr``, ``warmup``, ``ema_decay``, ``seed``, ``ckpt_every``, ``device`` and
    ``progress`` (which build it when it is None); the autoencoder stage takes its seed, checkpoint
    interval, device and progress.
    """
    if settings is None:
        settings = TrainSettings(steps=flow_steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                                 seed=seed, ckpt_every=ckpt_every, device=device, progress=progress)
    elif not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    seed, ckpt_every, device, progress = settings.seed, settings.ckpt_every, settings.device, settings.progress
    ds = _as_dataset(data, n=n, seed=seed)
    _check_images(ds)
    out_p = None if out is None else Path(out)
    t0 = time.perf_counter()
    ae, ae_res = train_autoencoder(ds, None if out_p is None else out_p / AE_DIR, ae_steps, hflip=hflip, seed=seed,
                                   ckpt_every=ckpt_every, device=device, progress=progress,
                                   allow_recipe_change=allow_recipe_change, **(ae_kwargs or {}))
    t1 = time.perf_counter()
    lat = encode_dataset(ae, ds, hflip=hflip)
    num_classes = ds.num_classes if (conditional and ds.y is not None) else None
    if not num_classes:
        lat = Dataset(lat.x, name=lat.name)
    cfg = dict(model) if isinstance(model, dict) else default_latent_model(ae.latent_shape, num_classes, model,
                                                                          width=width, depth=depth)
    net = build_model(cfg, seed=seed)
    if cond_dropout is None:
        cond_dropout = 0.1 if num_classes else 0.0
    flow = Flow(net, time_dist=time_dist, cond_dropout=cond_dropout)
    t2 = time.perf_counter()
    extra = {"latent": {"autoencoder": AE_DIR, "pixel_shape": list(ds.shape), "latent_shape": list(ae.latent_shape),
                        "hflip": bool(hflip), "autoencoder_recon": getattr(ae, "recon", {})},
             **_source(data, ds)}
    res = train(flow, lat, out=out_p, settings=settings, extra_config=extra, desc="latent flow",
                allow_recipe_change=allow_recipe_change)
    t3 = time.perf_counter()
    res.model.run_config = extra
    lf = LatentFlow(res.model, ae).eval()
    return LatentTrainResult(lf, out_p, ae_res, res,
                             {"autoencoder": t1 - t0, "encode": t2 - t1, "flow": t3 - t2, "total": t3 - t0})
