"""Blockwise flow matching (Park et al. 2025, "Blockwise Flow Matching").

The time axis is cut into ``K`` segments ``[t_k, t_{k+1})`` (the last one closed at 1) and each
segment gets its own, smaller velocity network::

    v(x, t) = v_k(x, t)   for t in [t_k, t_{k+1}),   0 = t_0 < t_1 < ... < t_K = 1.

Each row of a batch goes to the block that owns its ``t`` (mixed-``t`` batches work), so block
``k`` is trained only on times in its segment and receives gradient only from those rows.
Sampling costs one sub-network call per velocity evaluation.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .build import MODELS, build_model
from .embed import TimeLike, broadcast_time, jsonable

__all__ = ["BlockwiseFlow", "block_boundaries"]


def block_boundaries(num_blocks: int, boundaries: Optional[Sequence[float]] = None) -> List[float]:
    """``[0, t_1, ..., 1]``: uniform segments, or the given strictly increasing list (with 0 and 1)."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"blockwise: num_blocks must be an int >= 1, got {num_blocks!r}")
    if boundaries is None:
        return [k / num_blocks for k in range(num_blocks + 1)]
    b = [float(v) for v in boundaries]
    if len(b) != num_blocks + 1:
        raise ValueError(f"blockwise: {num_blocks} blocks need {num_blocks + 1} boundaries (0 ... 1), got {len(b)}: {b}")
    if b[0] != 0.0 or b[-1] != 1.0:
        raise ValueError(f"blockwise: boundaries must start at 0 and end at 1, got {b}")
    if any(b1 <= b0 for b0, b1 in zip(b, b[1:])):
        raise ValueError(f"blockwise: boundaries must be strictly increasing, got {b}")
    return b


class BlockwiseFlow(nn.Module):
    """``K`` velocity sub-networks, block ``k`` owning ``t in [t_k, t_{k+1})``.

    ``block``: the sub-network config (``{"name": "mlp", ...}``, any registered model), built
    ``num_blocks`` times with independent initialisations. ``boundaries``: ``K + 1`` increasing
    times from 0 to 1 (default: uniform). ``null_class``, ``num_classes`` and ``sample_shape``
    are those of the sub-networks. Extra conditioning tensors whose first dimension is the batch
    size (labels ``y``, a second time ``r``...) are split with the rows; others pass unchanged.
    """

    def __init__(self, block: Mapping[str, Any], num_blocks: int = 2,
                 boundaries: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if not isinstance(block, Mapping) or "name" not in block:
            raise ValueError(f"blockwise: block must be a model config dict with a 'name', got {block!r}")
        if block["name"] in ("blockwise", "bfm"):
            raise ValueError("blockwise: a block cannot itself be blockwise")
        bounds = block_boundaries(num_blocks, boundaries)
        self.blocks = nn.ModuleList([build_model(dict(block)) for _ in range(num_blocks)])
        first = self.blocks[0]
        self.config = jsonable({"name": "blockwise", "block": dict(first.config), "num_blocks": num_blocks,
                                "boundaries": None if boundaries is None else bounds})
        self.boundaries: List[float] = bounds  # plain floats: unaffected by .to(dtype), not in the state dict
        self.num_blocks = num_blocks
        self.num_classes = getattr(first, "num_classes", None)
        self.null_class = getattr(first, "null_class", None)
        self.sample_shape = getattr(first, "sample_shape", None)

    def block_index(self, t: Tensor) -> Tensor:
        """Block of each time: ``k`` with ``t_k <= t < t_{k+1}`` (``t = 1`` -> last block)."""
        inner = torch.tensor(self.boundaries[1:-1], device=t.device, dtype=torch.float64)
        idx = torch.bucketize(t.to(torch.float64), inner, right=True)
        return idx.clamp_(0, self.num_blocks - 1)

    def forward(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        b = x.shape[0]
        raw_t = t
        tb = broadcast_time(t, b, x.device)
        idx = self.block_index(tb)
        if self.num_blocks == 1 or b == 0:
            return self.blocks[0](x, tb if torch.is_tensor(raw_t) else raw_t, **cond)
        # keep the caller's time values (dtype) for the sub-networks
        t_rows = raw_t.reshape(-1).expand(b) if torch.is_tensor(raw_t) and raw_t.numel() == 1 else (
            raw_t.reshape(b) if torch.is_tensor(raw_t) else tb)
        out: Optional[Tensor] = None
        for k, net in enumerate(self.blocks):
            rows = (idx == k).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            ck = {n: (v.index_select(0, rows) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == b else v)
                  for n, v in cond.items()}
            vk = net(x.index_select(0, rows), t_rows.index_select(0, rows), **ck)
            if out is None:
                out = vk.new_zeros((b, *vk.shape[1:]))
            out = out.index_copy(0, rows, vk)
        assert out is not None  # every row lands in some block
        return out

    def extra_repr(self) -> str:
        return f"num_blocks={self.num_blocks}, boundaries={[round(v, 4) for v in self.boundaries]}"


MODELS.register("blockwise", aliases=("bfm",))(BlockwiseFlow)
