"""Shared conditioning pieces: sinusoidal time embedding, class embedding with a null class.

Time ``t`` lives in ``[0, 1]`` (0 = noise, 1 = data). It is scaled by 1000 before the usual
transformer/DDPM sin/cos features so that the frequencies cover the same range as for integer
diffusion steps. Class conditioning uses an embedding table of ``K + 1`` rows; row ``K`` is the
*null class* used by classifier-free guidance, and ``y=None`` means "all null".
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

TimeLike = Union[Tensor, float, int]

ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "mish": nn.Mish,
}


def make_activation(name: str) -> nn.Module:
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name.lower()]()


def jsonable(value: Any) -> Any:
    """Tuples become lists (recursively) so a config survives a JSON round trip unchanged."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def broadcast_time(t: TimeLike, batch: int, device: torch.device) -> Tensor:
    """Return ``t`` as a float32 tensor of shape ``(batch,)``.

    Accepts a Python number, a 0-d tensor, a 1-element tensor, or any tensor with ``batch``
    elements (``(B,)``, ``(B, 1)``, ``(B, 1, 1, 1)``...).
    """
    t = torch.as_tensor(t, device=device)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"t must be a real number or float tensor, got dtype {t.dtype}")
    t = t.to(torch.float32)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.numel() != batch:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or ({batch},) for a batch of {batch}")
    return t.reshape(batch)


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sin/cos features of ``scale * t``: ``(B,) -> (B, dim)`` (float32; odd ``dim`` zero-padded)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1)
    )
    args = (scale * t.to(torch.float32))[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SinusoidalTimeEmbedding(nn.Module):
    """``t in [0, 1]`` -> sinusoidal features of ``1000 t`` (``dim``) -> MLP -> ``out_dim``.

    With ``out_dim=None`` the MLP maps to ``4 * dim``. ``forward`` accepts ``(B,)`` or a scalar
    (pass ``batch`` to broadcast a scalar). ``scale`` multiplies ``t`` before the features
    (default 1000; a smaller value gives a smoother function of ``t``, which helps models trained
    through derivatives in ``t`` such as MeanFlow).
    """

    def __init__(self, dim: int, max_period: float = 10000.0, out_dim: Optional[int] = None, act: str = "silu",
                 scale: float = 1000.0) -> None:
        super().__init__()
        if int(dim) < 2:
            raise ValueError(f"time embedding dim must be >= 2, got {dim}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"time embedding scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.dim = int(dim)
        self.out_dim = int(out_dim) if out_dim is not None else 4 * self.dim
        self.max_period = float(max_period)
        self.mlp = nn.Sequential(
            nn.Linear(self.dim, self.out_dim), make_activation(act), nn.Linear(self.out_dim, self.out_dim)
        )

    def forward(self, t: TimeLike, batch: Optional[int] = None) -> Tensor:
        device = self.mlp[0].weight.device
        t = torch.as_tensor(t, device=device)
        t = broadcast_time(t, batch if batch is not None else max(t.numel(), 1), device)
        feats = timestep_features(t, self.dim, self.max_period, self.scale)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class IntervalEmbedding(nn.Module):
    """Second time input of average-velocity models: ``(t, r) -> emb(r - t)``.

    A :class:`SinusoidalTimeEmbedding` of the signed interval ``r - t`` (``r=None`` means
    ``r = t``) whose last layer is zero-initialised, so a fresh model ignores ``r``: at ``r = t``
    it starts as (and stays interchangeable with) a plain velocity model. Differentiable in
    ``t`` and ``r`` (``torch.func.jvp`` passes through it).
    """

    def __init__(self, dim: int, out_dim: int, act: str = "silu", scale: float = 1000.0) -> None:
        super().__init__()
        self.embed = SinusoidalTimeEmbedding(dim, out_dim=out_dim, act=act, scale=scale)
        nn.init.zeros_(self.embed.mlp[-1].weight)
        nn.init.zeros_(self.embed.mlp[-1].bias)

    def forward(self, t: TimeLike, r: Optional[TimeLike], batch: int) -> Tensor:
        device = self.embed.mlp[0].weight.device
        tb = broadcast_time(torch.as_tensor(t, device=device), batch, device)
        rb = tb if r is None else broadcast_time(torch.as_tensor(r, device=device), batch, device)
        return self.embed(rb - tb, batch=batch)


def _compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


class ClassEmbedding(nn.Module):
    """Embedding table with ``num_classes + 1`` rows; row ``num_classes`` is the null class.

    ``forward(None, batch)`` returns the null embedding for every sample. An int or 0-d tensor
    is broadcast to the batch.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 (or None for an unconditional model), got {num_classes}")
        self.num_classes = int(num_classes)
        self.null_class = self.num_classes
        self.table = nn.Embedding(self.num_classes + 1, int(dim))
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Optional[Union[Tensor, int]], batch: int) -> Tensor:
        device = self.table.weight.device
        if y is None:
            y = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        else:
            y = torch.as_tensor(y, device=device)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"class labels y must be an integer tensor, got dtype {y.dtype}")
            y = y.long()
            if y.numel() == 1:
                y = y.reshape(1).expand(batch)
            elif y.numel() != batch:
                raise ValueError(f"y has shape {tuple(y.shape)}; expected ({batch},) or a scalar")
            y = y.reshape(batch)
            # eager CPU only: under torch.compile the host read would break the graph (the embedding
            # lookup itself still rejects out-of-range labels), on CUDA it would sync every call
            if (y.device.type == "cpu" and not _compiling() and y.numel()
                    and (int(y.min()) < 0 or int(y.max()) > self.null_class)):
                raise ValueError(
                    f"class labels must be in [0, {self.num_classes}] ({self.num_classes} is the null class); "
                    f"got min {int(y.min())}, max {int(y.max())}"
                )
        return self.table(y)


def check_unconditional(y: Any, name: str) -> None:
    if y is not None:
        raise ValueError(f"{name} was built without num_classes (unconditional) but was given y; pass y=None")


def drop_labels(y: Tensor, p: float, null_class: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Replace each label by ``null_class`` with probability ``p`` (classifier-free guidance training)."""
    if p <= 0:
        return y
    mask = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(mask, torch.full_like(y, null_class), y)


def conditioning(module: nn.Module, t: TimeLike, r: Optional[Tensor], y: Optional[Tensor], batch: int, name: str) -> Tensor:
    """The summed conditioning vector of a velocity network (before its activation): time embedding
    ``module.time_embed`` + interval embedding ``module.interval_embed`` (mean-flow models only; ``r``
    is refused otherwise) + class embedding ``module.class_embed`` (unconditional models refuse ``y``)."""
    emb = module.time_embed(t, batch=batch)
    if module.interval_embed is not None:
        emb = emb + module.interval_embed(t, r, batch)
    elif r is not None:
        raise ValueError(f"{name}: r (second time) given but the model was built without mean_flow=True")
    if module.class_embed is not None:
        emb = emb + module.class_embed(y, batch)
    else:
        check_unconditional(y, name)
    return emb


def with_time_options(config: Dict[str, Any], mean_flow: bool, time_scale: float) -> Dict[str, Any]:
    """``config`` plus the two-time (``mean_flow``) and ``time_scale`` keys, each only when not at its
    default, so default configs (and checkpoints written before these options) stay as they were."""
    if mean_flow:
        config["mean_flow"] = True
    if float(time_scale) != 1000.0:
        config["time_scale"] = float(time_scale)
    return jsonable(config)
