"""STARFlow (Gu et al. 2025, "STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis").

A TarFlow in the latent space of the library's autoencoder (:class:`straightflow.models.Autoencoder`,
normalised latents ``z = (enc(x) - shift) / scale``), with

- the **deep-shallow** design: the block next to the prior (the first one sampled) has ``deep_layers``
  layers, the other blocks ``layers`` (shallow);
- exact maximum likelihood on noise-augmented latents ``z + sigma eps`` (``noise_std = sigma``);
- the **learned denoiser** replacing TarFlow's score step: a copy of the decoder fine-tuned to map noisy
  latents to images, ``min E |dec'(z + sigma eps) - x|^2`` (STARFlow fine-tunes its decoder the same way);
- guidance of the AR steps (:mod:`.guidance`, ``kind="starflow"``).

Sampling: ``eps ~ N(0, I)`` in latent space -> invert the flow (sequential or GS-Jacobi) -> ``dec'``.
``log_prob(x)`` is the exact log-density of the image's latent ``enc(x)`` under the flow (a latent
likelihood, not a pixel one: the autoencoder is not invertible).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoint import load_config, save_model
from ..data import Dataset, load_dataset
from ..models import Autoencoder, MODELS, build_model
from ..train import TrainSettings
from .tarflow import TarFlow
from .train import NF_OBJECTIVE, default_nf_config, train_nf

__all__ = ["StarFlow", "train_starflow"]


class StarFlow(nn.Module):
    """``autoencoder``: the Autoencoder config (with its latent statistics); ``flow``: the latent TarFlow
    config. Holds the autoencoder, the flow and the denoising decoder (an Autoencoder whose decoder was
    fine-tuned on noisy latents)."""

    def __init__(self, autoencoder: Mapping[str, Any], flow: Mapping[str, Any]) -> None:
        super().__init__()
        self.ae = build_model(dict(autoencoder))
        if not isinstance(self.ae, Autoencoder):
            raise ValueError(f"StarFlow needs an autoencoder config, got model {autoencoder.get('name')!r}")
        fl = {k: v for k, v in flow.items() if k != "name"}
        self.latent_flow = TarFlow(**fl)
        if tuple(self.latent_flow.sample_shape) != tuple(self.ae.latent_shape):
            raise ValueError(f"the flow's sample_shape {self.latent_flow.sample_shape} is not the autoencoder's "
                             f"latent shape {tuple(self.ae.latent_shape)}")
        self.denoiser = copy.deepcopy(self.ae)
        self.sample_shape = (self.ae.in_channels, self.ae.resolution, self.ae.resolution)
        self.num_classes = self.latent_flow.num_classes
        self.null_class = self.latent_flow.null_class
        self.config: Dict[str, Any] = {"name": "starflow", "autoencoder": dict(autoencoder),
                                       "flow": {**dict(flow), "name": "tarflow"}}

    def encode_latents(self, x: Tensor) -> Tensor:
        return self.ae.encode(x)

    def decode_latents(self, z: Tensor) -> Tensor:
        """The learned denoiser: noisy latents (as sampled) -> images."""
        return self.denoiser.decode(z)

    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Exact log-density (nats) of the latents ``enc(x)`` under the flow."""
        return self.latent_flow.log_prob(self.encode_latents(x), y)

    def loss(self, x: Tensor, y: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.latent_flow.loss(self.encode_latents(x).detach(), y, generator)

    def calls(self) -> int:
        return self.latent_flow.calls()


if "starflow" not in MODELS:
    MODELS.register("starflow")(StarFlow)


def train_starflow(data: Union[str, Dataset], out: Union[str, Path], ae_steps: int = 2000, flow_steps: int = 2000,
                   denoiser_steps: int = 500, noise_std: float = 0.1, deep_layers: int = 4, layers: int = 1,
                   blocks: int = 4, width: int = 64, patch_size: int = 1, batch_size: int = 64, lr: float = 1e-3,
                   seed: int = 0, conditional: bool = True, n: Optional[int] = None, progress: bool = True,
                   latent_channels: int = 4, base_channels: int = 32) -> StarFlow:
    """Train a STARFlow in three stages, each resumable: the autoencoder (``out/autoencoder``), the
    latent deep-shallow TarFlow (``out/flow``, the library's trainer), the denoising decoder; then write
    ``out`` (``straightflow.load(out)`` returns the :class:`StarFlow`). A rerun after a kill resumes the
    unfinished stage and skips finished ones."""
    from ..images.latent import encode_dataset, train_autoencoder  # same layer (features): latent tools

    out = Path(out)
    if isinstance(data, str):
        ds, source, split = load_dataset(data, n=n, seed=seed, split="train"), data, "train"
    else:
        ds, source, split = data, data.name, None
    ae, _ = train_autoencoder(ds, out / "autoencoder", ae_steps, latent_channels=latent_channels,
                              base_channels=base_channels, batch_size=batch_size, seed=seed, progress=progress,
                              ckpt_every=max(1, ae_steps // 4))
    ae.eval()
    lat = encode_dataset(ae, ds)
    num_classes = ds.num_classes if (conditional and ds.y is not None) else None
    fcfg = default_nf_config(lat.shape, num_classes, blocks=blocks, width=width, layers=layers,
                             deep_layers=deep_layers, patch_size=patch_size, noise_std=noise_std)
    res = train_nf(lat, out / "flow", model_config=fcfg, steps=flow_steps, conditional=conditional,
                   settings=TrainSettings(steps=flow_steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                                          ckpt_every=max(1, flow_steps // 4), ema_decay=0.0))
    model = StarFlow(ae.config, res.model.config)
    model.ae.load_state_dict(ae.state_dict())
    model.latent_flow.load_state_dict(res.model.state_dict())
    model.denoiser.load_state_dict(ae.state_dict())
    _finetune_denoiser(model, ds.x, denoiser_steps, noise_std, batch_size, lr, seed, progress)
    cfg = {"flow": {"objective": NF_OBJECTIVE, "stages": ["autoencoder", "flow", "denoiser"]},
           "data": {"name": ds.name, "shape": list(ds.shape), "labels": num_classes is not None,
                    "num_classes": num_classes},
           "data_source": source, "train": {"steps": flow_steps, "seed": seed},
           "starflow": {"ae_steps": ae_steps, "flow_steps": flow_steps, "denoiser_steps": denoiser_steps}}
    if split:
        cfg["data_split"] = split
    save_model(out, model.eval(), cfg)
    return model


def _finetune_denoiser(model: StarFlow, x: Tensor, steps: int, sigma: float, batch: int, lr: float, seed: int,
                       progress: bool) -> None:
    """``min E |dec'(enc(x) + sigma eps) - x|^2`` over the denoiser's decoder (the encoder stays fixed)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed + 1)
    params = [p for name, p in model.denoiser.named_parameters() if not name.startswith("enc")]
    opt = torch.optim.Adam(params, lr=lr * 0.5)
    model.ae.eval()
    for _ in tqdm(range(steps), desc="denoiser", disable=not progress or steps < 50, dynamic_ncols=True):
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        with torch.no_grad():
            z = model.ae.encode(xb)
        z = z + sigma * torch.randn(z.shape, generator=g)
        loss = (model.denoiser.decode(z) - xb).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
