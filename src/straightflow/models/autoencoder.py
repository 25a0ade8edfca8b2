"""Convolutional autoencoder for latent flow matching (Dao et al. 2023, "Flow Matching in Latent Space").

Choice: a **deterministic autoencoder** (no sampling in the bottleneck, no KL term) trained with
pixel MSE plus a tiny L2 penalty on the raw latents (``latent_penalty``, default 1e-4) that only
keeps their scale from drifting. The latent given to the flow is then **normalised per channel**,
``z = (enc(x) - shift) / scale`` with ``shift``/``scale`` the per-channel mean/std of the raw
latents over the training set (stored in ``config``: ``latent_shift``, ``latent_scale``), so the
flow sees roughly unit-variance latents, the same role as Stable Diffusion's constant 0.18215
(whose VAE KL weight, 1e-6, makes it effectively deterministic too).

Encoder: 3x3 conv, per level ``num_res_blocks`` GroupNorm/SiLU residual blocks and a stride-2 conv
between levels, then a 1x1 conv to ``latent_channels``: ``(C, R, R) -> (latent_channels, R/f, R/f)``
with ``f = 2 ** (len(channel_mults) - 1)`` (28 -> 7 and 32 -> 8 with three levels). The decoder
mirrors it with nearest-neighbour x2 upsampling + 3x3 convs. Fully convolutional: any input size
divisible by ``f`` works.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embed import jsonable

__all__ = ["Autoencoder"]


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(_groups(cin), cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.n2 = nn.GroupNorm(_groups(cout), cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class _Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Autoencoder(nn.Module):
    """``encode(x) -> z`` (normalised latents), ``decode(z) -> x``; ``forward(x)`` reconstructs.

    ``encode_raw``/``decode_raw`` skip the normalisation. ``set_latent_stats(shift, scale)``
    stores the per-channel statistics (and updates ``config``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 28,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        latent_penalty: float = 1e-4,
        latent_shift: Optional[Sequence[float]] = None,
        latent_scale: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        for name, value in (("in_channels", in_channels), ("resolution", resolution),
                            ("base_channels", base_channels), ("num_res_blocks", num_res_blocks),
                            ("latent_channels", latent_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Autoencoder: {name} must be an int >= 1, got {value!r}")
        if not mults or min(mults) < 1:
            raise ValueError(f"Autoencoder: channel_mults must be positive ints, got {list(channel_mults)}")
        self.factor = 2 ** (len(mults) - 1)
        if resolution % self.factor:
            raise ValueError(f"Autoencoder: resolution {resolution} is not divisible by the downsampling "
                             f"factor {self.factor} (channel_mults={list(mults)})")
        if float(latent_penalty) < 0:
            raise ValueError(f"Autoencoder: latent_penalty must be >= 0, got {latent_penalty}")
        self.in_channels, self.resolution, self.latent_channels = in_channels, resolution, latent_channels
        self.latent_penalty = float(latent_penalty)
        self.sample_shape = (in_channels, resolution, resolution)
        self.latent_shape: Tuple[int, int, int] = (latent_channels, resolution // self.factor,
                                                   resolution // self.factor)
        self._base = {"name": "autoencoder", "in_channels": in_channels, "resolution": resolution,
                      "base_channels": base_channels, "channel_mults": mults, "num_res_blocks": num_res_blocks,
                      "latent_channels": latent_channels, "latent_penalty": float(latent_penalty)}

        enc: List[nn.Module] = [nn.Conv2d(in_channels, base_channels * mults[0], 3, padding=1)]
        ch = base_channels * mults[0]
        for i, m in enumerate(mults):
            for _ in range(num_res_blocks):
                enc.append(_Res(ch, base_channels * m))
                ch = base_channels * m
            if i != len(mults) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)

        dec: List[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1)]
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(num_res_blocks):
                dec.append(_Res(ch, base_channels * m))
                ch = base_channels * m
            if i != 0:
                dec.append(_Up(ch))
        dec += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

        self.register_buffer("shift", torch.zeros(latent_channels), persistent=False)
        self.register_buffer("scale", torch.ones(latent_channels), persistent=False)
        self.set_latent_stats(latent_shift, latent_scale)

    # ------------------------------------------------------------------ statistics
    def set_latent_stats(self, shift: Optional[Sequence[float]], scale: Optional[Sequence[float]]) -> None:
        """Store per-channel ``shift``/``scale`` (None: identity) and record them in ``config``."""
        k = self.latent_channels
        sh = torch.zeros(k) if shift is None else torch.as_tensor(list(map(float, shift)), dtype=torch.float32)
        sc = torch.ones(k) if scale is None else torch.as_tensor(list(map(float, scale)), dtype=torch.float32)
        if sh.shape != (k,) or sc.shape != (k,):
            raise ValueError(f"Autoencoder: latent_shift/latent_scale need {k} values (one per latent channel), "
                             f"got {tuple(sh.shape)} and {tuple(sc.shape)}")
        if not bool(torch.isfinite(sh).all()) or not bool((sc > 0).all()) or not bool(torch.isfinite(sc).all()):
            raise ValueError("Autoencoder: latent_scale must be finite and > 0 and latent_shift finite")
        self.shift.copy_(sh.to(self.shift.device))
        self.scale.copy_(sc.to(self.scale.device))
        self.config = jsonable({**self._base,
                                "latent_shift": None if shift is None else [float(v) for v in sh],
                                "latent_scale": None if scale is None else [float(v) for v in sc]})

    @torch.no_grad()
    def fit_latent_stats(self, x: Tensor, batch_size: int = 512) -> Tuple[List[float], List[float]]:
        """Per-channel mean/std of the raw latents of ``x``; stores and returns them."""
        z = torch.cat([self.encode_raw(x[i:i + batch_size].to(self.shift.device))
                       for i in range(0, x.shape[0], batch_size)])
        mean = z.mean(dim=(0, 2, 3))
        std = z.std(dim=(0, 2, 3)).clamp_min(1e-6)
        self.set_latent_stats(mean.tolist(), std.tolist())
        return mean.tolist(), std.tolist()

    # ------------------------------------------------------------------ maps
    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"Autoencoder.{what} expects (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode_raw(self, x: Tensor) -> Tensor:
        self._check(x, self.in_channels, "encode")
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"Autoencoder: size {tuple(x.shape[-2:])} is not divisible by {self.factor}")
        return self.encoder(x)

    def decode_raw(self, z: Tensor) -> Tensor:
        self._check(z, self.latent_channels, "decode")
        return self.decoder(z)

    def encode(self, x: Tensor) -> Tensor:
        """``z = (enc(x) - shift) / scale`` (per channel)."""
        return (self.encode_raw(x) - self.shift[:, None, None]) / self.scale[:, None, None]

    def decode(self, z: Tensor) -> Tensor:
        """``x = dec(z * scale + shift)``."""
        return self.decode_raw(z * self.scale[:, None, None] + self.shift[:, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_raw(self.encode_raw(x))

    def loss(self, x: Tensor) -> Tensor:
        """Reconstruction MSE + ``latent_penalty * mean(z_raw^2)``."""
        z = self.encode_raw(x)
        rec = F.mse_loss(self.decode_raw(z), x)
        return rec + self.latent_penalty * z.pow(2).mean() if self.latent_penalty else rec

    def extra_repr(self) -> str:
        return f"in={self.sample_shape}, latent={self.latent_shape}"
