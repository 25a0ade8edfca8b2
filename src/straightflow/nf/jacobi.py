"""GS-Jacobi sampling of TarFlow (Liu et al. 2025, "Accelerate TarFlow Sampling with GS-Jacobi Iteration").

Inverting one block means solving the triangular system ``x_i = mu_i(x_<i) + exp(alpha_i(x_<i)) z_i``.
**Gauss-Seidel across blocks**: the blocks are inverted one after the other (each block's output is the
next block's input). **Within a block** the ``T - 1`` unknown tokens are cut into ``segments`` contiguous
segments, solved in order (Gauss-Seidel over segments); inside a segment, **Jacobi** fixed-point
iterations update all its tokens in parallel from the current guess,

    x^(j+1)_i = mu_i(x^(j)_<i) + exp(alpha_i(x^(j)_<i)) z_i      (one transformer call per iteration),

with the finished segments read from a key/value cache. A segment stops when
``max_i |x^(j+1)_i - x^(j)_i| <= tol`` or after ``max_iters`` iterations (default: the segment length
``L``, after which the solution is exact: iteration ``j`` makes the first ``j`` tokens exact, because the
map is causal). So ``tol = 0`` reproduces sequential inversion (to floating-point rounding of the
batched attention), and a segment's cache is taken from its last iteration (exact at ``tol = 0``).

The paper's two metrics, computed on a batch of data passed forward through the flow
(:func:`block_metrics`):

- **Convergence Ranking Metric** (CRM) of a block:
  ``CRM = ||mean_b(exp(-alpha) * x)||_2 * ||W_alpha||_2 + ||W_mu||_2`` with ``x`` the block's input
  (block order), ``alpha`` its log-scales, and ``W_alpha, W_mu`` the two halves of the output projection
  (spectral norms). Blocks with a large share of the total CRM are "tough" (they need more iterations):
  :func:`plan_from_metrics` gives them ``tough_segments`` segments, the others ``segments``.
- **Initial Guessing Metric** (IGM) of a start ``x^0``: the norm ``||mean_b(x^1 - x)||_2`` of the error
  of one Jacobi update from ``x^0`` against the true input ``x``; candidates are ``"latent"``
  (``x^0 = z``, the block's own latent) and ``"zero"`` (``x^0 = (z_0, 0, ..., 0)``); the smaller wins.

Where this approximates the paper: the tough/simple split is a share threshold (``tough_share``,
default ``1.5 / K``) rather than the paper's hand-picked per-model settings, and iterations stop on the
max-abs change (the paper's code uses a normalised 2-norm).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .tarflow import ARBlock, TarFlow
from .tokens import check_batch, from_tokens, to_tokens
from .transformer import KV, extend

__all__ = ["BlockPlan", "JacobiStats", "INITS", "jacobi_block", "gs_jacobi", "block_metrics", "plan_from_metrics"]

INITS = ("latent", "zero")


@dataclass(frozen=True)
class BlockPlan:
    """How one block is solved: ``segments`` Jacobi segments, the initial guess (``"latent"`` or
    ``"zero"``) and ``max_iters`` per segment (None: the segment length, which is exact). ``front``:
    an addition to the paper — each iteration recomputes only the tokens after the converged front and
    commits the converged ones to the cache (fewer tokens per call; still exact at ``tol = 0``)."""

    segments: int = 1
    init: str = "latent"
    max_iters: Optional[int] = None
    front: bool = False


@dataclass
class JacobiStats:
    """Per block (in sampling order): transformer calls and iterations per segment."""

    calls: List[int] = field(default_factory=list)
    iterations: List[List[int]] = field(default_factory=list)

    @property
    def total_calls(self) -> int:
        return sum(self.calls)


def _segments(n: int, k: int) -> List[Tuple[int, int]]:
    """``k`` contiguous near-equal segments of the unknown positions ``1 .. n`` (as ``[a, b)``)."""
    k = max(1, min(int(k), n))
    edges = [1 + round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def jacobi_block(block: ARBlock, z: Tensor, y: Optional[Tensor] = None, plan: BlockPlan = BlockPlan(),
                 tol: float = 1e-4, guidance: Optional[float] = None, kind: str = "tarflow") -> Tuple[Tensor, List[int]]:
    """Invert one block by segment-wise Jacobi iteration (module docstring); ``(x, iterations per segment)``."""
    if plan.init not in INITS:
        raise ValueError(f"unknown initial guess {plan.init!r}; valid: {', '.join(INITS)}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    zp = block.order(z)
    x = zp.clone() if plan.init == "latent" else torch.cat([zp[:, :1], torch.zeros_like(zp[:, 1:])], 1)
    prefix: Optional[KV] = None
    iters: List[int] = []
    for a, b in _segments(zp.shape[1] - 1, plan.segments):
        cap = b - a if plan.max_iters is None else max(1, min(int(plan.max_iters), b - a))
        if plan.front:
            it, prefix = _front_segment(block, x, zp, y, prefix, a, b, cap, tol, guidance, kind)
            iters.append(it)
            continue
        for it in range(cap):
            alpha, mu, kv = block.step(x[:, a - 1:b - 1], y, prefix, a - 1, guidance, kind)
            new = mu + torch.exp(alpha) * zp[:, a:b]
            change = float((new - x[:, a:b]).abs().max())
            x[:, a:b] = new
            if change <= tol:
                break
        iters.append(it + 1)
        prefix = extend(prefix, kv)
    return block.order(x), iters


def _front_segment(block: ARBlock, x: Tensor, zp: Tensor, y: Optional[Tensor], prefix: Optional[KV], a: int, b: int,
                   cap: int, tol: float, guidance: Optional[float], kind: str) -> Tuple[int, Optional[KV]]:
    """One segment with a moving front: each iteration recomputes only positions ``lo .. b-1``, then commits
    (to the key/value cache) the leading positions whose change is ``<= tol`` — at least one, position
    ``lo``, which is exact because all its inputs are committed. Updates ``x`` in place."""
    lo, it = a, 0
    while lo < b:
        alpha, mu, kv = block.step(x[:, lo - 1:b - 1], y, prefix, lo - 1, guidance, kind)
        new = mu + torch.exp(alpha) * zp[:, lo:b]
        d = (new - x[:, lo:b]).abs().amax(dim=(0, 2))
        x[:, lo:b] = new
        it += 1
        bad = torch.nonzero(d > tol)
        k = int(bad[0, 0]) if len(bad) else b - lo
        if it >= cap:
            k = b - lo
        k = max(k, 1)
        prefix = extend(prefix, [(kk[:, :, :k], vv[:, :, :k]) for kk, vv in kv])
        lo += k
    return it, prefix


@torch.no_grad()
def gs_jacobi(model: TarFlow, z: Tensor, y: Optional[Tensor] = None, plan: Optional[Sequence[BlockPlan]] = None,
              tol: float = 1e-4, guidance: Optional[float] = None, kind: str = "tarflow",
              segments: int = 1, front: bool = False) -> Tuple[Tensor, JacobiStats]:
    """GS-Jacobi inversion of every block, prior to data; ``plan[k]`` is block ``k``'s plan (block index
    as in ``model.blocks``; default ``BlockPlan(segments)`` for all). Returns ``(x, JacobiStats)``."""
    check_batch(z, model.sample_shape)
    K = len(model.blocks)
    plan = list(plan) if plan is not None else [BlockPlan(segments, front=front)] * K
    if len(plan) != K:
        raise ValueError(f"the plan has {len(plan)} entries; the model has {K} blocks")
    h = to_tokens(z, model.patch_size)
    stats = JacobiStats()
    for k in reversed(range(K)):
        block = model.blocks[k]
        c0 = block.calls
        h, it = jacobi_block(block, h, y, plan[k], tol, guidance, kind)
        stats.calls.append(block.calls - c0)
        stats.iterations.append(it)
    return from_tokens(h, model.sample_shape, model.patch_size), stats


@torch.no_grad()
def block_metrics(model: TarFlow, x: Tensor, y: Optional[Tensor] = None) -> List[Dict[str, float]]:
    """Per block (index as in ``model.blocks``): ``{"crm", "crm_share", "igm_latent", "igm_zero"}`` on data
    ``x`` (a calibration batch; see the module docstring for the formulas)."""
    check_batch(x, model.sample_shape)
    h = to_tokens(x, model.patch_size)
    out: List[Dict[str, float]] = []
    for block in model.blocks:
        xp = block.order(h)
        alpha, mu, _ = block.params(xp[:, :-1], y)
        zp = torch.cat([xp[:, :1], (xp[:, 1:] - mu) * torch.exp(-alpha)], 1)
        w_alpha, w_mu = block.proj_out.weight.chunk(2, dim=0)
        spec = lambda m: float(torch.linalg.matrix_norm(m, ord=2))  # noqa: E731
        crm = spec((torch.exp(-alpha) * xp[:, 1:]).mean(0)) * spec(w_alpha) + spec(w_mu)
        igm = {}
        for name, x0 in (("latent", zp), ("zero", torch.cat([zp[:, :1], torch.zeros_like(zp[:, 1:])], 1))):
            a0, m0, _ = block.params(x0[:, :-1], y)
            igm[name] = spec((m0 + torch.exp(a0) * zp[:, 1:] - xp[:, 1:]).mean(0))
        out.append({"crm": crm, "igm_latent": igm["latent"], "igm_zero": igm["zero"]})
        h = block.order(zp)
    total = sum(m["crm"] for m in out) or 1.0
    for m in out:
        m["crm_share"] = m["crm"] / total
    return out


def plan_from_metrics(metrics: Sequence[Dict[str, float]], segments: int = 1, tough_segments: int = 4,
                      tough_share: Optional[float] = None, max_iters: Optional[int] = None,
                      front: bool = False) -> List[BlockPlan]:
    """A :class:`BlockPlan` per block from :func:`block_metrics`: a block whose CRM share is at least
    ``tough_share`` (default ``1.5 / K``) gets ``tough_segments`` segments, the others ``segments``; each
    starts from the initial guess with the smaller IGM."""
    K = len(metrics)
    thr = 1.5 / K if tough_share is None else float(tough_share)
    return [BlockPlan(segments=tough_segments if m["crm_share"] >= thr else segments,
                      init="latent" if m["igm_latent"] <= m["igm_zero"] else "zero", max_iters=max_iters,
                      front=front)
            for m in metrics]
