"""Diffusion Transformer velocity model (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

``x (B, C, H, W)`` is cut into ``p x p`` patches (a stride-``p`` conv), each patch becomes a token
plus a 2D positional embedding; ``depth`` transformer blocks run with **adaLN-Zero** modulation:
from the conditioning vector ``c`` each block regresses ``(shift, scale, gate)`` for its attention
and MLP branches, ``h = h + gate * branch(LN(h) * (1 + scale) + shift)``, with the regression layer
zero-initialised so every block starts as the identity. The final layer (adaLN + linear) is also
zero-initialised, so a fresh model predicts ``v = 0``. Tokens are then folded back into the image
("unpatchify").

Conditioning ``c`` from time ``t`` (sinusoidal features of ``1000 t`` + MLP) and, for a
class-conditional model, a label embedding with a null class (row ``num_classes``; ``y=None``
means "all null", as classifier-free guidance needs). ``cond_mode``:

- ``"add"`` (DiT): ``c = e_t(t) + e_y(y)``, both embeddings of width ``hidden``.
- ``"concat"`` (SD3-style separate embeddings, Esser et al. 2024): ``e_t`` and ``e_y`` keep
  separate widths (``hidden`` each) and are concatenated, ``c = W [e_t; e_y]`` (a learned
  projection), so time and class information are not forced to share one sum.

Positional embeddings (``pos_embed``): ``"sincos"`` (fixed 2D sin/cos, computed for any patch
grid, so the model runs at resolutions other than the training one, e.g. for Bottleneck
Sampling) or ``"learned"`` (a table for the training grid, bicubically interpolated for other
grids). Attention is ``torch.nn.functional.scaled_dot_product_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embed import ClassEmbedding, SinusoidalTimeEmbedding, TimeLike, check_unconditional, jsonable

__all__ = ["DiT", "sincos_2d"]

COND_MODES = ("add", "concat")
POS_EMBEDS = ("sincos", "learned")


def sincos_2d(dim: int, grid_h: int, grid_w: int, device=None, dtype=torch.float32) -> Tensor:
    """Fixed 2D sin/cos positional embedding ``(grid_h * grid_w, dim)``: half the channels encode
    the row, half the column, each with sin/cos at frequencies ``10000^(-k / (dim/4))``."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64, device=device),
                            torch.arange(grid_w, dtype=torch.float64, device=device), indexing="ij")
    out = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        a = pos[:, None] * omega[None, :]
        out += [torch.sin(a), torch.cos(a)]
    return torch.cat(out, dim=1).to(dtype)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (b, heads, n, d/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero: 6 modulation vectors from ``c``, zero-initialised."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None, :] * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None, :] * self.mlp(_modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch * patch * channels)
        for layer in (self.ada, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT velocity model ``v = model(x, t, y=None)`` for ``x`` of shape ``(B, in_channels, H, W)``.

    ``resolution`` (training size) must be divisible by ``patch_size``; inputs of any size
    divisible by ``patch_size`` are accepted (see ``pos_embed``). ``hidden`` must be divisible by
    ``heads`` and (for sin/cos positions) by 4. See the module docstring for ``cond_mode``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 8,
        patch_size: int = 2,
        hidden: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: Optional[int] = None,
        cond_mode: str = "add",
        pos_embed: str = "sincos",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("resolution", resolution), ("patch_size", patch_size),
                            ("hidden", hidden), ("depth", depth), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiT: {name} must be an int >= 1, got {value!r}")
        if resolution % patch_size:
            raise ValueError(f"DiT: resolution {resolution} is not divisible by patch_size {patch_size}")
        if hidden % heads:
            raise ValueError(f"DiT: hidden {hidden} is not divisible by heads {heads}")
        if cond_mode not in COND_MODES:
            raise ValueError(f"DiT: unknown cond_mode {cond_mode!r}; valid: {', '.join(COND_MODES)}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"DiT: unknown pos_embed {pos_embed!r}; valid: {', '.join(POS_EMBEDS)}")
        if pos_embed == "sincos" and hidden % 4:
            raise ValueError(f"DiT: sin/cos positions need hidden divisible by 4, got {hidden}")
        if not float(mlp_ratio) > 0:
            raise ValueError(f"DiT: mlp_ratio must be > 0, got {mlp_ratio}")
        self.config = jsonable({
            "name": "dit", "in_channels": in_channels, "resolution": resolution, "patch_size": patch_size,
            "hidden": hidden, "depth": depth, "heads": heads, "mlp_ratio": float(mlp_ratio),
            "num_classes": num_classes, "cond_mode": cond_mode, "pos_embed": pos_embed,
        })
        self.in_channels, self.resolution, self.patch_size = in_channels, resolution, patch_size
        self.hidden, self.cond_mode, self.pos_embed_kind = hidden, cond_mode, pos_embed
        self.sample_shape = (in_channels, resolution, resolution)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.null_class = self.num_classes
        self.grid = resolution // patch_size

        self.patch = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        if pos_embed == "learned":
            self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden))
            nn.init.normal_(self.pos, std=0.02)
        else:
            self.register_buffer("pos", sincos_2d(hidden, self.grid, self.grid)[None], persistent=False)
        self.time_embed = SinusoidalTimeEmbedding(hidden, out_dim=hidden)
        self.class_embed = ClassEmbedding(self.num_classes, hidden) if self.num_classes is not None else None
        self.cond_proj = nn.Linear(2 * hidden, hidden) if (cond_mode == "concat" and self.num_classes) else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, float(mlp_ratio)) for _ in range(depth))
        self.final = FinalLayer(hidden, patch_size, in_channels)

    def positions(self, gh: int, gw: int) -> Tensor:
        """Positional embedding ``(1, gh * gw, hidden)`` for a ``gh x gw`` patch grid."""
        if gh == self.grid and gw == self.grid:
            return self.pos
        if self.pos_embed_kind == "sincos":
            return sincos_2d(self.hidden, gh, gw, device=self.pos.device, dtype=self.pos.dtype)[None]
        table = self.pos.reshape(1, self.grid, self.grid, self.hidden).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, gh * gw, self.hidden)

    def condition(self, t: TimeLike, y: Optional[Tensor], batch: int) -> Tensor:
        c = self.time_embed(t, batch=batch)
        if self.class_embed is None:
            check_unconditional(y, "DiT")
        else:
            e = self.class_embed(y, batch)
            c = self.cond_proj(torch.cat([c, e], dim=1)) if self.cond_proj is not None else c + e
        return F.silu(c)

    def forward(self, x: Tensor, t: TimeLike, y: Optional[Tensor] = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DiT expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DiT: spatial size {(h, w)} is not divisible by patch_size {p}")
        gh, gw = h // p, w // p
        c = self.condition(t, y, b)
        tok = self.patch(x).flatten(2).transpose(1, 2) + self.positions(gh, gw)  # (b, gh*gw, hidden)
        for block in self.blocks:
            tok = block(tok, c)
        out = self.final(tok, c)  # (b, gh*gw, p*p*C)
        out = out.reshape(b, gh, gw, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.in_channels, h, w)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, resolution={self.resolution}, patch_size={self.patch_size}, "
                f"tokens={self.grid * self.grid}, num_classes={self.num_classes}, cond_mode={self.cond_mode!r}")

