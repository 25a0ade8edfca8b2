"""Bottleneck Sampling (Tian et al. 2025, "Training-free Diffusion Acceleration with Bottleneck Sampling").

A high -> low -> high resolution schedule for models that accept several resolutions (the fully
convolutional UNet, the DiT with sin/cos or interpolated positions): the first stage fixes the
global layout at full resolution, the middle stage runs at ``1/factor`` of the resolution (about
``factor^2`` times cheaper per evaluation, more for attention), the last stage restores detail at
full resolution.

Times. One grid of ``n1 + n2 + n3`` steps (``grid``) is cut at step ``n1`` (time ``t_a``) and step
``n1 + n2`` (time ``t_b``); stage ``k`` integrates its piece with ``solver``.

Stage transitions ("noise reintroduction", in our convention t = 0 noise, t = 1 data). At a cut
time ``t`` the data prediction of the linear path ``x1_hat = x + (1 - t) v(x, t)`` (one counted
velocity evaluation at the old resolution) is resized (area averaging down, ``up_mode`` up) and
re-noised with fresh Gaussian noise at the new resolution to an earlier time
``t' = (1 - renoise) t``: ``x' = t' resize(x1_hat) + (1 - t') eps``. The stage's grid piece is
mapped linearly from ``[t, t_end]`` onto ``[t', t_end]`` (same number of steps), and with
``stage_shift`` each piece can be redistributed by the SD3 shift (``shift > 1``: more steps at
the noisy end of the stage), the paper's per-stage scheduler re-shifting. Fresh noise matters on
the way up: an upsampled noisy state carries blocky, spatially correlated noise the model never
saw in training.

With ``factor == 1`` or an empty middle stage there is no transition and the result is
*exactly* ``straightflow.sample`` on the same grid (the tests check this). NFE: ``.nfe`` counts
every evaluation (transition evaluations included); ``.info["full_res_nfe"]`` weighs low-resolution
evaluations by ``1 / factor^2`` (their share of pixels), a model-agnostic cost proxy.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..grids import make_grid
from ..solvers import SampleResult, get_solver, sample, solve
from ..solvers.base import CountedVelocity
from ..solvers.noise import initial_noise
from ..time import shift_time

__all__ = ["bottleneck_sample", "UP_MODES"]

UP_MODES = ("nearest", "bilinear", "bicubic")


def _piece(g: Tensor, start: float, shift: float) -> Tensor:
    """Map grid piece ``g`` (increasing) onto ``[start, g[-1]]`` linearly, then apply the shift."""
    t0, t1 = float(g[0]), float(g[-1])
    u = (g - t0) / (t1 - t0)
    if shift != 1.0:
        u = shift_time(u, shift)
    return start + (t1 - start) * u


def _transition(f: CountedVelocity, x: Tensor, t: float, size: Tuple[int, int], renoise: float, mode: str,
                generator: Optional[torch.Generator], i: int) -> Tuple[Tensor, float]:
    if t >= 1.0:  # at the data end the state is its own prediction
        x1_hat = x
    elif t <= 0.0:  # at the noise end nothing is known yet: fresh noise follows
        x1_hat = torch.zeros_like(x)
    else:
        x1_hat = x + (1.0 - t) * f(x, t, i)
    if tuple(size) < tuple(x.shape[-2:]):
        x1_hat = F.interpolate(x1_hat, size=size, mode="area")
    else:
        kw = {} if mode == "nearest" else {"align_corners": False}
        x1_hat = F.interpolate(x1_hat, size=size, mode=mode, **kw)
    t_new = (1.0 - renoise) * t
    eps = torch.randn(x1_hat.shape, generator=generator, dtype=x1_hat.dtype,
                      device=generator.device if generator is not None else x1_hat.device).to(x1_hat.device)
    return t_new * x1_hat + (1.0 - t_new) * eps, t_new


@torch.no_grad()
def bottleneck_sample(
    model: Any,
    noise: Union[Tensor, Sequence[int]],
    solver: str = "euler",
    stage_steps: Sequence[int] = (4, 8, 4),
    grid: str = "uniform",
    factor: int = 2,
    renoise: float = 0.0,
    stage_shift: Sequence[float] = (1.0, 1.0, 1.0),
    up_mode: str = "nearest",
    cond: Optional[Dict[str, Any]] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    grid_options: Optional[Dict[str, Any]] = None,
    check_finite: bool = True,
    **solver_options: Any,
) -> SampleResult:
    """High -> low -> high resolution sampling; see the module docstring for the algorithm.

    ``noise``: full-resolution noise ``(B, C, H, W)`` or its shape (drawn with ``seed``).
    ``stage_steps``: steps ``(n1, n2, n3)`` per stage (``n2 = 0`` or ``factor = 1``: plain
    sampling). ``H`` and ``W`` must be divisible by ``factor`` (and the low resolution must suit
    the model, e.g. be divisible by the DiT patch size or the UNet's downsampling factor).
    """
    get_solver(solver)
    steps = [int(s) for s in stage_steps]
    if len(steps) != 3 or min(steps) < 0 or sum(steps) < 1:
        raise ValueError(f"stage_steps must be three step counts >= 0 (high, low, high) with a positive sum, got {list(stage_steps)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    if not 0.0 <= float(renoise) < 1.0:
        raise ValueError(f"renoise must be in [0, 1), got {renoise}")
    shifts = [float(s) for s in stage_shift]
    if len(shifts) != 3 or min(shifts) <= 0:
        raise ValueError(f"stage_shift must be three positive numbers, got {list(stage_shift)}")
    if up_mode not in UP_MODES:
        raise ValueError(f"unknown up_mode {up_mode!r}; valid: {', '.join(UP_MODES)}")
    x, generator = initial_noise(noise, seed, generator)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0 if seed is None else int(seed))
    if x.ndim != 4:
        raise ValueError(f"bottleneck sampling needs images (B, C, H, W), got shape {tuple(x.shape)}")
    n1, n2, n3 = steps
    total = n1 + n2 + n3
    g = make_grid(grid, total, **(grid_options or {}))
    opts = dict(solver_options)
    if factor == 1 or n2 == 0:
        r = sample(model, x, solver=solver, steps=None, grid=g, cond=cond, generator=generator,
                   check_finite=check_finite, **opts)
        r.info.update({"stages": steps, "factor": factor, "full_res_nfe": float(r.nfe), "bottleneck": False})
        return r
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {(h, w)} is not divisible by factor {factor}")
    low = (h // factor, w // factor)
    spec = get_solver(solver)
    if spec.stochastic:
        opts.setdefault("generator", generator)
    f = CountedVelocity(model, cond, check_finite=check_finite)
    nfe_hi = nfe_lo = 0
    times = []
    cuts = [0, n1, n1 + n2, total]
    start = float(g[0])
    for k in range(3):
        piece = g[cuts[k]: cuts[k + 1] + 1]
        if k > 0:  # transition into stage k
            size = low if k == 1 else (h, w)
            before = f.nfe
            x, start = _transition(f, x, float(piece[0]), size, float(renoise), up_mode, generator, cuts[k])
            if k == 1:
                nfe_hi += f.nfe - before
            else:
                nfe_lo += f.nfe - before
        if piece.numel() < 2:
            continue
        piece = _piece(piece, start, shifts[k])
        times.append(piece)
        r = solve(model, x, piece, solver, cond=cond, check_finite=check_finite, **opts)
        x = r.x
        if k == 1:
            nfe_lo += r.nfe
        else:
            nfe_hi += r.nfe
    nfe = nfe_hi + nfe_lo
    info = {"solver": spec.name, "stages": steps, "factor": factor, "renoise": float(renoise), "bottleneck": True,
            "nfe_high": nfe_hi, "nfe_low": nfe_lo, "full_res_nfe": nfe_hi + nfe_lo / factor ** 2,
            "stage_times": [p.tolist() for p in times]}
    return SampleResult(x=x, nfe=nfe, times=torch.cat(times), info=info)
