"""BOSS: Bellman Optimal Step-size Straightening (Nguyen et al. 2023).

The time grid for a solver and an NFE budget that minimises the summed one-step (local)
error along the reference trajectory, found exactly by dynamic programming:

    min over 0 = t_{n_0} < ... < t_{n_steps} = 1 of  sum_k C[n_{k-1}, n_k],
    C[i, j] = mean_{batch, elements} (x_ref(t_j) - Phi(x_ref(t_i); t_i -> t_j))^2,

with ``Phi`` one step of the solver. :func:`boss_cost_table` builds ``C`` over candidate
fine-grid points, :func:`bellman_path` solves ``D_k(j) = min_{i < j} D_{k-1}(i) + C[i, j]``
exactly, :func:`boss_grid` puts the two together.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..grids import validate_grid
from ..paths import PathLike as PathSpec
from ..solvers.base import CountedVelocity, NonFiniteError
from .base import NoiseLike, _check_deterministic, _noise, _repeat_cond, _solver_options
from .reference import ReferenceTrajectory, reference_trajectory


def _candidate_indices(fine_steps: int, n_candidates: Optional[int]) -> List[int]:
    if n_candidates is None or n_candidates >= fine_steps:
        return list(range(fine_steps + 1))
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    idx = torch.linspace(0, fine_steps, n_candidates + 1, dtype=torch.float64).round().long().tolist()
    return sorted(set(int(i) for i in idx))


@torch.no_grad()
def boss_cost_table(
    model: Callable, ref: ReferenceTrajectory, solver: str = "euler", n_candidates: Optional[int] = None,
    cond: Optional[Dict[str, Any]] = None, path: PathSpec = "linear", max_rows: int = 1 << 16,
) -> Tuple[Tensor, List[int], int]:
    """Local-error table ``C[a, b]`` between candidate fine-grid indices ``idx[a] < idx[b]``.

    ``C[a, b] = mean_{batch, elements} (x_ref(t_j) - Phi_solver(x_ref(t_i); t_i -> t_j))^2`` with
    ``i = idx[a], j = idx[b]`` and ``Phi`` one step of the solver; ``C = inf`` where ``a >= b``.
    For Euler ``Phi = x_ref(t_i) + (t_j - t_i) v(x_ref(t_i), t_i)`` uses the stored reference
    velocities (no model calls; ``n_candidates=None`` = all ``fine_steps + 1`` points). Other solvers
    need fresh calls: every pair is one step from a reference state, evaluated with all pairs
    stacked along the batch (chunks of at most ``max_rows`` rows), so the table costs
    ``evals_per_step * ceil(pairs * B / max_rows)`` batched calls (+ ``evals_per_step`` calls once
    to check the stacked step against a scalar-time step; solvers that need scalar times fall
    back to one solve per pair); ``n_candidates`` defaults to 32 intervals for them. A multistep
    solver contributes its (one-step) starting method.
    Returns ``(C, idx, model_calls)``.
    """
    spec = _check_deterministic(solver)
    n = ref.fine_steps
    if n_candidates is None and spec.name != "euler":
        n_candidates = 32
    idx = _candidate_indices(n, n_candidates)
    M = len(idx)
    ts = ref.times[idx]
    X = ref.xs[idx]
    C = torch.full((M, M), math.inf, dtype=torch.float64)
    B = X.shape[1]
    if spec.name == "euler":
        V = ref.vs[idx]
        bshape = (-1,) + (1,) * (X.ndim - 1)
        for a in range(M - 1):
            dt = (ts[a + 1:] - ts[a]).to(X.dtype).reshape(bshape)
            err = X[a + 1:] - X[a] - dt * V[a]
            C[a, a + 1:] = err.double().pow(2).flatten(1).mean(1)
        return C, idx, 0

    pairs = [(a, b) for a in range(M - 1) for b in range(a + 1, M)]
    per_chunk = max(1, max_rows // max(B, 1))
    opts = _solver_options(spec, path)
    calls = 0
    batched, checked = True, False
    for c0 in range(0, len(pairs), per_chunk):
        chunk = pairs[c0:c0 + per_chunk]
        P = len(chunk)
        a_idx = torch.tensor([p[0] for p in chunk])
        b_idx = torch.tensor([p[1] for p in chunk])
        x0 = X[a_idx].reshape(P * B, *X.shape[2:])
        target = X[b_idx].reshape(P * B, *X.shape[2:])
        rshape = (P * B,) + (1,) * (X.ndim - 2)
        T0 = ts[a_idx].repeat_interleave(B).to(X.dtype).reshape(rshape)
        T1 = ts[b_idx].repeat_interleave(B).to(X.dtype).reshape(rshape)
        f = CountedVelocity(model, _repeat_cond(cond, B, P))
        out = None
        if batched:
            try:
                out = spec.run(f, x0, [T0, T1], **opts)
            except NonFiniteError:
                raise
            except Exception:  # the solver needs scalar times
                batched = False
            calls += f.calls
            if out is not None and not checked:  # once: the stacked step equals a scalar-time step
                a, b = chunk[0]
                g = CountedVelocity(model, cond)
                one = spec.run(g, X[a], [float(ts[a]), float(ts[b])], **opts)
                calls += g.nfe
                checked = True
                if not torch.allclose(one, out[:B], rtol=1e-6, atol=1e-9 * (1 + float(one.abs().max()))):
                    batched, out = False, None
        if out is None:  # fall back to one solve per pair
            outs = []
            for a, b in chunk:
                g = CountedVelocity(model, cond)
                outs.append(spec.run(g, X[a], [float(ts[a]), float(ts[b])], **opts))
                calls += g.nfe
            out = torch.cat(outs)
        err = (out - target).double().pow(2).reshape(P, -1).mean(1)
        C[a_idx, b_idx] = err
    return C, idx, calls


def bellman_path(cost: Tensor, steps: int) -> Tuple[List[int], float]:
    """Exact minimum of ``sum_k cost[n_{k-1}, n_k]`` over paths ``0 = n_0 < n_1 < ... < n_steps = M-1``.

    Bellman recursion ``D_k(j) = min_{i < j} D_{k-1}(i) + cost[i, j]``, ``D_0 = [0, inf, ...]``,
    answer ``D_steps(M - 1)``; O(M^2 steps) time. ``cost`` is (M, M) with ``inf`` where ``i >= j``.
    Returns the node indices (``steps + 1`` of them) and the optimal total cost.
    """
    C = torch.as_tensor(cost, dtype=torch.float64)
    M = C.shape[0]
    if C.ndim != 2 or C.shape[1] != M:
        raise ValueError(f"cost must be square, got {tuple(C.shape)}")
    if not isinstance(steps, int) or steps < 1 or steps > M - 1:
        raise ValueError(f"steps must be an int in [1, {M - 1}] for {M} candidate times, got {steps!r}")
    C = C.masked_fill(~torch.ones(M, M, dtype=torch.bool).triu(1), math.inf)
    D = torch.full((M,), math.inf, dtype=torch.float64)
    D[0] = 0.0
    back = []
    for _ in range(steps):
        total = D[:, None] + C  # (i, j)
        D, arg = total.min(0)
        back.append(arg)
    path = [M - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    path.reverse()
    return path, float(D[M - 1])


@torch.no_grad()
def boss_grid(
    model: Callable,
    noise_or_shape: NoiseLike,
    nfe: int,
    solver: str = "euler",
    fine_steps: int = 256,
    cond: Optional[Dict[str, Any]] = None,
    path: PathSpec = "linear",
    seed: int = 0,
    n_candidates: Optional[int] = None,
    reference: Optional[ReferenceTrajectory] = None,
    return_info: bool = False,
):
    """BOSS time grid (Nguyen et al. 2023) for ``solver`` at ``nfe`` evaluations per sample.

    With ``steps = get_solver(solver).steps_for_nfe(nfe)`` and a reference trajectory ``x_ref``
    (RK4, ``fine_steps`` uniform steps, on the calibration batch ``noise_or_shape``; a shape is
    drawn with ``seed``), the grid is the solution of

        min over 0 = t_{n_0} < t_{n_1} < ... < t_{n_steps} = 1 (n_k fine/candidate indices) of
            sum_k  E_batch mean_elements || x_ref(t_{n_k}) - Phi(x_ref(t_{n_{k-1}}); t_{n_{k-1}} -> t_{n_k}) ||^2

    where ``Phi`` is one step of the solver (Euler: ``x + (t_j - t_i) v(x, t_i)``), solved exactly
    by :func:`bellman_path`, O(M^2 steps) for M candidate intervals.

    Calibration cost (model calls on the calibration batch): the reference, ``4 fine_steps + 1``;
    the Euler cost table reuses the reference's velocities (all ``fine_steps + 1`` points are
    candidates, no more calls); other solvers restrict to ``n_candidates`` (default 32) uniformly
    spaced fine points and cost ``evals_per_step`` calls per chunk of stacked pairs (see
    :func:`boss_cost_table`). ``reference`` reuses a :func:`reference_trajectory` (then
    ``noise_or_shape`` is ignored). Returns the float64 grid (``steps + 1`` times, 0 and 1
    included), or ``(grid, info)`` with ``return_info=True`` (``info["calibration_nfe"]``).
    """
    spec = _check_deterministic(solver)
    steps = spec.steps_for_nfe(int(nfe))
    if reference is None:
        x = _noise(noise_or_shape, seed)
        reference = reference_trajectory(model, x, fine_steps, cond)
    C, idx, calls = boss_cost_table(model, reference, spec.name, n_candidates, cond=cond, path=path)
    if steps > len(idx) - 1:
        raise ValueError(
            f"{steps} steps need at least as many candidate intervals; got {len(idx) - 1} "
            "(raise fine_steps or n_candidates)")
    nodes, cost = bellman_path(C, steps)
    grid = validate_grid(reference.times[[idx[k] for k in nodes]].clone(), direction=1)
    if not return_info:
        return grid
    return grid, {"solver": spec.name, "steps": steps, "local_cost": cost, "candidates": len(idx) - 1,
                  "fine_steps": reference.fine_steps, "calibration_nfe": reference.nfe + calls,
                  "reference_nfe": reference.nfe, "table_calls": calls}
