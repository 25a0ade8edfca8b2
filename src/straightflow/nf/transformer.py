"""A small pre-norm causal transformer with an explicit key/value prefix (for KV-cached decoding).

``forward(h, prefix)`` runs the tokens ``h: (B, L, W)`` at positions ``S .. S+L-1`` where ``prefix``
holds the keys and values of positions ``0 .. S-1`` for every layer (``None``: ``S = 0``). Token ``i``
attends to every prefix position and to the tokens ``<= i`` of ``h`` (causal). It returns the outputs
and the keys/values of ``h`` per layer, so a caller appends them to the prefix once the tokens are
final (sequential decoding appends one token per call; Jacobi decoding appends a whole segment).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalTransformer", "KV"]

KV = List[Tuple[Tensor, Tensor]]  # per layer: keys, values (B, heads, S, head_dim)


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, expansion: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.n2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, expansion * width), nn.GELU(), nn.Linear(expansion * width, width))

    def forward(self, h: Tensor, prefix: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        b, n, w = h.shape
        q, k, v = self.qkv(self.n1(h)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        kk, vv = (k, v) if prefix is None else (torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2))
        s = kk.shape[2] - n
        mask = torch.ones(n, n + s, dtype=torch.bool, device=h.device).tril(s)  # prefix visible, causal inside
        a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.n2(h)), (k, v)


class CausalTransformer(nn.Module):
    """``layers`` pre-norm blocks of ``width`` channels and ``heads`` heads (MLP ``expansion`` x)."""

    def __init__(self, width: int, layers: int, heads: int, expansion: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.layers = nn.ModuleList([_Layer(width, heads, expansion) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)

    def forward(self, h: Tensor, prefix: Optional[KV] = None) -> Tuple[Tensor, KV]:
        new: KV = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, None if prefix is None else prefix[i])
            new.append(kv)
        return self.norm(h), new


def extend(prefix: Optional[KV], new: KV) -> KV:
    """``prefix`` with ``new`` appended along the sequence (a new list; tensors are not modified)."""
    if prefix is None:
        return [(k, v) for k, v in new]
    return [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(prefix, new)]
