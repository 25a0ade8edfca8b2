"""Sampling a TarFlow/STARFlow: the prior noise, an inversion solver, then the denoising step.

Solvers (:data:`NF_SOLVERS`): ``"sequential"`` (token by token, KV cache; the reference) and
``"gs-jacobi"`` (:mod:`.jacobi`). ``sample_nf`` reports the transformer calls it spent (a guided call
runs the conditional and null-class rows as one doubled batch and counts once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..registry import Registry
from .jacobi import BlockPlan, JacobiStats, gs_jacobi
from .tarflow import TarFlow

__all__ = ["NF_SOLVERS", "NFSample", "sample_nf", "nf_solvers"]

NF_SOLVERS: Registry = Registry("normalizing-flow solver")
NF_SOLVERS.register("sequential", aliases=("seq",))("sequential")
NF_SOLVERS.register("gs-jacobi", aliases=("gs_jacobi", "gsjacobi", "jacobi"))("gs-jacobi")


def nf_solvers() -> List[str]:
    """Names ``sample --solver`` accepts for a normalizing-flow run."""
    return NF_SOLVERS.names()


@dataclass
class NFSample:
    """``x``: the samples (after denoising when asked); ``raw``: before denoising; ``calls``: transformer
    calls of the inversion; ``stats``: GS-Jacobi iterations (None for sequential)."""

    x: Tensor
    raw: Tensor
    calls: int
    solver: str
    stats: Optional[JacobiStats] = None


@torch.no_grad()
def _invert(model: TarFlow, z: Tensor, y: Optional[Tensor], solver: str, guidance: Optional[float], kind: str,
            tol: float, segments: int, plan: Optional[Sequence[BlockPlan]], front: bool):
    if solver == "sequential":
        return model.decode(z, y, guidance, kind), None
    return gs_jacobi(model, z, y, plan=plan, tol=tol, guidance=guidance, kind=kind, segments=segments, front=front)


def sample_nf(model: TarFlow, noise: Union[int, Tensor], y: Optional[Tensor] = None, solver: str = "sequential",
              guidance: Optional[float] = None, kind: str = "tarflow", denoise: bool = True, tol: float = 1e-4,
              segments: int = 1, plan: Optional[Sequence[BlockPlan]] = None, seed: int = 0,
              front: bool = False) -> NFSample:
    """Sample ``model`` (a TarFlow, or a STARFlow: its latent flow, then its denoising decoder) from ``noise``
    (a prior draw in the flow's shape, or a count drawn with ``seed``).

    ``guidance``: a CFG scale (1: unguided; None: off) of ``kind`` ``"tarflow"`` or ``"starflow"``;
    ``tol``/``segments``/``plan``/``front``: the GS-Jacobi settings (:mod:`.jacobi`); ``denoise``: the score step
    ``x + sigma^2 grad log p(x)`` (TarFlow) afterwards.
    """
    name = NF_SOLVERS.canonical(solver)
    flow = getattr(model, "latent_flow", model)  # STARFlow: the flow lives in the autoencoder's latent space
    if isinstance(noise, int):
        g = torch.Generator().manual_seed(int(seed))
        p = next(model.parameters())
        noise = torch.randn((noise, *flow.sample_shape), generator=g).to(device=p.device, dtype=p.dtype)
    c0 = flow.calls()
    raw, stats = _invert(flow, noise, y, name, guidance, kind, tol, segments, plan, front)
    calls = flow.calls() - c0
    if flow is not model:  # STARFlow's learned denoiser (the fine-tuned decoder) replaces the score step
        with torch.no_grad():
            x = model.decode_latents(raw)
    else:
        x = model.denoise(raw, y) if denoise else raw
    return NFSample(x=x.detach(), raw=raw, calls=calls, solver=name, stats=stats)
