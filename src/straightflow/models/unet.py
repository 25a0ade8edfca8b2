"""Small DDPM-style UNet velocity model for images ``(B, C, H, W)``.

GroupNorm + SiLU residual blocks whose normalised activations are modulated by the
time (+ class) embedding with a scale/shift, stride-2 conv downsampling, nearest + conv
upsampling, skip connections, and optional multi-head self-attention at the resolutions listed
in ``attention_resolutions`` (listing the lowest resolution also adds a middle ResBlock +
attention). Works at 8x8 (digits), 16x16, 28x28 (MNIST: 28 -> 14 -> 7) and 32x32.
The final conv is zero-initialised, so a fresh model predicts ``v = 0``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embed import ClassEmbedding, IntervalEmbedding, SinusoidalTimeEmbedding, TimeLike, conditioning, with_time_options


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest of 32, 16, ..., 1 dividing ``channels`` with >= 4 channels per group."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int = 32) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            self.heads = 1
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (b, heads, hw, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """3x3 conv at the low resolution (to the next level's width), then nearest-neighbour x2.

    Convolving before upsampling costs a quarter of the usual conv-after; on CPU that matters.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")


class UNet(nn.Module):
    """Velocity UNet: ``v = model(x, t, y=None)`` for ``x`` of shape ``(B, in_channels, H, W)``.

    ``channel_mults`` gives one level per entry (``base_channels * mult`` channels) with
    ``num_res_blocks`` residual blocks on the way down and as many on the way up, each up block
    concatenating the output of its mirror down block (skip connection); every level but the
    last halves the resolution, so ``resolution`` must be divisible by
    ``2 ** (len(channel_mults) - 1)``. ``time_dim`` (width of the time/class embedding) defaults
    to ``4 * base_channels``.

    ``mean_flow=True`` adds a second time input for average-velocity models (MeanFlow,
    SplitMeanFlow): ``u = model(x, t, y, r=r)``, the interval ``r - t`` embedded separately
    (zero-initialised, so ``r = t`` / ``r=None`` is a plain velocity model) and added to the
    time embedding. ``time_scale`` multiplies the times before their sinusoidal features (default 1000).
    """

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 8,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        num_classes: Optional[int] = None,
        dropout: float = 0.0,
        time_dim: Optional[int] = None,
        mean_flow: bool = False,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        channel_mults = tuple(int(m) for m in channel_mults)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        for name, value, low in (("in_channels", in_channels, 1), ("resolution", resolution, 1),
                                 ("base_channels", base_channels, 1), ("num_res_blocks", num_res_blocks, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"UNet: {name} must be an int >= {low}, got {value!r}")
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"UNet: channel_mults must be a non-empty list of positive ints, got {list(channel_mults)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
        factor = 2 ** (len(channel_mults) - 1)
        if resolution % factor:
            raise ValueError(
                f"UNet: resolution {resolution} is not divisible by 2**(len(channel_mults)-1) = {factor} "
                f"(channel_mults={list(channel_mults)} downsamples {len(channel_mults) - 1} times); "
                f"use fewer levels or a resolution that is a multiple of {factor}"
            )
        resolutions = [resolution // 2**i for i in range(len(channel_mults))]
        bad = [r for r in attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(
                f"UNet: attention_resolutions {bad} are not resolutions of this network {resolutions}"
            )
        config = {"name": "unet", "in_channels": in_channels, "resolution": resolution, "base_channels": base_channels,
                  "channel_mults": channel_mults, "num_res_blocks": num_res_blocks,
                  "attention_resolutions": attention_resolutions, "num_classes": num_classes,
                  "dropout": float(dropout), "time_dim": time_dim}
        self.config = with_time_options(config, mean_flow, time_scale)
        self.mean_flow = bool(mean_flow)
        self.in_channels = in_channels
        self.resolution = resolution
        self.sample_shape = (in_channels, resolution, resolution)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.null_class = self.num_classes
        self._factor = factor
        emb_dim = int(time_dim) if time_dim is not None else 4 * base_channels

        self.time_embed = SinusoidalTimeEmbedding(base_channels, out_dim=emb_dim, scale=time_scale)
        self.interval_embed = IntervalEmbedding(base_channels, emb_dim, scale=time_scale) if self.mean_flow else None
        self.class_embed = ClassEmbedding(self.num_classes, emb_dim) if self.num_classes is not None else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs: List[int] = []
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, out_ch, emb_dim, dropout))
                ch = out_ch
                if resolutions[level] in attention_resolutions:
                    self.down.append(AttnBlock(ch))
                skip_chs.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(ch))

        # Middle block: only with attention at the lowest resolution (ResBlock + attention); without
        # it the last down level and the first up level already give 2 * num_res_blocks blocks there,
        # and a plain mid ResBlock would cost ~15% more time for little gain at these sizes.
        self.mid = nn.ModuleList()
        if resolutions[-1] in attention_resolutions:
            self.mid.append(ResBlock(ch, ch, emb_dim, dropout))
            self.mid.append(AttnBlock(ch))

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mults))):
            out_ch = base_channels * channel_mults[level]
            for _ in range(num_res_blocks):
                self.up.append(ResBlock(ch + skip_chs.pop(), out_ch, emb_dim, dropout))
                ch = out_ch
                if resolutions[level] in attention_resolutions:
                    self.up.append(AttnBlock(ch))
            if level != 0:
                nxt = base_channels * channel_mults[level - 1]
                self.up.append(Upsample(ch, nxt))
                ch = nxt
        assert not skip_chs

        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: TimeLike, y: Optional[Tensor] = None, r: Optional[TimeLike] = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self._factor or x.shape[-1] % self._factor:
            raise ValueError(
                f"UNet: spatial size {tuple(x.shape[-2:])} is not divisible by {self._factor} "
                f"(built for {self.resolution}x{self.resolution})"
            )
        b = x.shape[0]
        emb = conditioning(self, t, r, y, b, "UNet")
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips: List[Tensor] = []
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
                skips.append(h)
            elif isinstance(layer, AttnBlock):
                h = layer(h)
                skips[-1] = h
            else:
                h = layer(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, resolution={self.resolution}, num_classes={self.num_classes}"
                + (", mean_flow=True" if self.mean_flow else ""))
