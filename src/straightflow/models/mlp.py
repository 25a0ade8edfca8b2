"""Residual MLP velocity model for vectors ``(B, D)`` (2-D toys, low-dimensional data)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .embed import (
    ClassEmbedding,
    IntervalEmbedding,
    SinusoidalTimeEmbedding,
    TimeLike,
    conditioning,
    make_activation,
    with_time_options,
)


class _ResBlock(nn.Module):
    """``h + W2 act(W1 LN(h) + E emb)``: pre-norm residual block with an additive embedding."""

    def __init__(self, hidden: int, act: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.emb(emb)))


class MLP(nn.Module):
    """Velocity MLP: ``v = model(x, t, y=None)`` for ``x`` of shape ``(B, dim)``.

    ``depth`` residual blocks of width ``hidden``; the time embedding (sinusoidal features of
    size ``time_dim`` -> MLP -> ``hidden``) plus the class embedding (``num_classes + 1`` rows,
    last = null class) is added in every block. The output layer is zero-initialised, so a fresh
    model predicts ``v = 0``. Inputs of shape ``(B, *shape)`` with ``prod(shape) == dim`` are
    flattened and the output reshaped back.

    ``mean_flow=True`` adds a second time input for average-velocity models (MeanFlow,
    SplitMeanFlow; :mod:`straightflow.straighten.meanflow`): ``u = model(x, t, y, r=r)`` is the
    average velocity from the state's time ``t`` to the time ``r``. The interval ``r - t`` gets
    its own sinusoidal embedding (zero-initialised output, so at ``r = t`` -- and for ``r=None``,
    which means ``r = t`` -- the model is a plain velocity model) added to the time embedding.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        time_dim: int = 64,
        num_classes: Optional[int] = None,
        act: str = "silu",
        mean_flow: bool = False,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 0), ("time_dim", time_dim, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MLP: {name} must be an int >= {low}, got {value!r}")
        make_activation(act)  # validate early with a clear message
        config = {"name": "mlp", "dim": dim, "hidden": hidden, "depth": depth, "time_dim": time_dim,
                  "num_classes": num_classes, "act": act}
        self.config = with_time_options(config, mean_flow, time_scale)
        self.mean_flow = bool(mean_flow)
        self.dim = dim
        self.sample_shape = (dim,)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.null_class = self.num_classes

        self.time_embed = SinusoidalTimeEmbedding(time_dim, out_dim=hidden, act=act, scale=time_scale)
        self.interval_embed = IntervalEmbedding(time_dim, hidden, act, scale=time_scale) if self.mean_flow else None
        self.class_embed = ClassEmbedding(self.num_classes, hidden) if self.num_classes is not None else None
        self.emb_act = make_activation(act)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([_ResBlock(hidden, act) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out_act = make_activation(act)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: TimeLike, y: Optional[Tensor] = None, r: Optional[TimeLike] = None) -> Tensor:
        shape = x.shape
        if x.ndim < 2:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(shape)}")
        if x.ndim > 2:
            x = x.reshape(shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"MLP was built for dim={self.dim}, got x of shape {tuple(shape)}")
        b = x.shape[0]
        emb = conditioning(self, t, r, y, b, "MLP")
        emb = self.emb_act(emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_act(self.out_norm(h))).reshape(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}" + (", mean_flow=True" if self.mean_flow else "")
