"""Inversion and editing: plain inversion with any deterministic solver, the RF-Inversion
controlled ODEs, and class-swap editing with a structure-preservation knob.

RF-Inversion (Rout et al. 2024, "Semantic Image Inversion and Editing using Rectified
Stochastic Differential Equations"), written in this library's convention (t = 0 noise, t = 1
data). Both controlled ODEs blend the model velocity ``v`` with the velocity of the straight line
to a fixed target:

- inversion (integrated 1 -> 0, towards a fixed noise sample ``z``), controller strength ``gamma``:
  ``dx/dt = v + gamma ((x - z) / t - v)``   (the paper's ``u + gamma (u(.|y1) - u)`` after ``s = 1 - t``);
- editing (integrated 0 -> 1, towards the reference image ``x_ref``), strength ``eta`` on a window:
  ``dx/dt = v + eta ((x_ref - x) / (1 - t) - v)`` for ``t`` in ``window`` (default ``[0, 0.25)``).

The straight-line term is singular at ``t = 0`` (inversion) / ``t = 1`` (editing); at that single
time the controller is off (a solver stage evaluated there sees the plain field). With
``gamma = 0`` / ``eta = 0`` the wrapper returns the model's velocity unchanged, so the result is
bit-for-bit plain :func:`straightflow.invert` / :func:`straightflow.sample`.

Class-swap editing (:func:`class_swap_edit`): invert the source image with its class down to the
time ``t_K`` of grid index ``inject = K`` (the first ``K`` of the regeneration's ``steps`` steps are
shared with, i.e. injected from, the source trajectory), then regenerate from ``t_K`` with the
target class. ``K = 0`` inverts to noise and regenerates fully; ``K = steps`` returns the source.
Every function reports its true NFE (guided evaluations count the rows they computed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..grids import GridLike, make_grid
from ..solvers import available, get_solver, invert, sample, solve
from ..solvers.guidance import ClassifierFreeGuidance
from ..solvers.noise import initial_noise

__all__ = ["ControlledVelocity", "rf_invert", "rf_edit", "class_swap_edit", "EditResult",
           "inversion_roundtrip", "deterministic_solvers"]


def deterministic_solvers(exclude: Sequence[str] = (), adaptive: bool = False) -> list:
    """Registered solvers usable for inversion: deterministic ones, adaptive ones (``spec.adaptive``)
    only with ``adaptive=True``, minus the names in ``exclude``."""
    return [n for n in available() if not get_solver(n).stochastic and (adaptive or not get_solver(n).adaptive)
            and n not in exclude]


class ControlledVelocity:
    """``v_c(x, t) = v + lam(t) (u_target(x, t) - v)``: the RF-Inversion controlled field.

    ``target_time=0``: ``u = (x - target) / t`` (the line through ``target`` at ``t = 0``: noise);
    ``target_time=1``: ``u = (target - x) / (1 - t)`` (the line through ``target`` at ``t = 1``: data).
    ``lam(t) = strength`` for ``window[0] <= t <= window[1]`` (the singular time excluded), else 0.
    Forwards ``evals_per_call`` of the wrapped model (guided rows are counted by the solver).
    """

    def __init__(self, model: Callable, target: Tensor, strength: float, target_time: int,
                 window: Tuple[float, float] = (0.0, 1.0)) -> None:
        if target_time not in (0, 1):
            raise ValueError(f"target_time must be 0 (noise) or 1 (data), got {target_time!r}")
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"controller strength must be in [0, 1], got {strength}")
        lo, hi = (float(w) for w in window)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"controller window must satisfy 0 <= lo <= hi <= 1, got {window!r}")
        self.model, self.target, self.strength = model, target, float(strength)
        self.target_time, self.window = target_time, (lo, hi)

    @property
    def evals_per_call(self) -> int:
        return int(getattr(self.model, "evals_per_call", 1))

    def active(self, t: float) -> bool:
        gap = t if self.target_time == 0 else 1.0 - t
        return self.strength > 0.0 and self.window[0] <= t <= self.window[1] and gap > 0.0

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        v = self.model(x, t, **cond)
        t0 = float(t.reshape(-1)[0])
        if not self.active(t0):
            return v
        if self.target.shape != x.shape:
            raise ValueError(f"controller target shape {tuple(self.target.shape)} != state shape {tuple(x.shape)}")
        if self.target_time == 0:
            u = (x - self.target) / t0
        else:
            u = (self.target - x) / (1.0 - t0)
        return v + self.strength * (u - v)


def _cfg(model: Callable, guidance) -> Callable:
    if guidance is None:
        return model
    if isinstance(guidance, ClassifierFreeGuidance):
        return guidance
    return ClassifierFreeGuidance(model, float(guidance))


def rf_invert(model: Callable, x1: Tensor, gamma: float = 0.5, noise: Optional[Tensor] = None,
              solver: str = "euler", steps: int = 28, grid: GridLike = "uniform", cond: Optional[Dict[str, Any]] = None,
              window: Tuple[float, float] = (0.0, 1.0), seed: int = 0, t_stop: float = 0.0,
              return_trajectory: bool = False):
    """RF-Inversion controlled forward ODE (Algorithm 1): data ``x1`` -> ``t_stop`` (default noise).

    ``noise`` is the fixed target ``z`` (drawn with ``seed`` when omitted; ``info['target_noise']``).
    ``gamma = 0`` is exactly :func:`straightflow.invert`. Returns the solver's ``SampleResult``.
    """
    spec = get_solver(solver)
    if spec.stochastic:
        raise ValueError(f"solver {spec.name!r} is stochastic; inversion needs a deterministic solver")
    if noise is None:
        noise, _ = initial_noise(x1.shape, seed, dtype=x1.dtype, device=x1.device)
    g = make_grid(grid, steps, t0=float(t_stop), t1=1.0).flip(0)
    f = ControlledVelocity(model, noise, gamma, target_time=0, window=window) if gamma > 0 else model
    res = solve(f, x1, g, spec.name, cond=cond, return_trajectory=return_trajectory)
    res.info.update({"gamma": float(gamma), "target_noise": noise})
    return res


def rf_edit(model: Callable, x0: Tensor, reference: Tensor, eta: float = 0.9, window: Tuple[float, float] = (0.0, 0.25),
            solver: str = "euler", steps: int = 28, grid: GridLike = "uniform", cond: Optional[Dict[str, Any]] = None,
            guidance=None, t_start: float = 0.0, return_trajectory: bool = False):
    """RF-Inversion controlled reverse ODE (Algorithm 2): ``x0`` (at ``t_start``) -> data, pulled
    towards ``reference`` with strength ``eta`` on ``window``. ``eta = 0`` is exactly
    :func:`straightflow.sample`. ``guidance``: a CFG scale or object (rows counted in the NFE)."""
    spec = get_solver(solver)
    g = make_grid(grid, steps, t0=float(t_start), t1=1.0)
    base = _cfg(model, guidance)
    f = ControlledVelocity(base, reference, eta, target_time=1, window=window) if eta > 0 else base
    res = solve(f, x0, g, spec.name, cond=cond, return_trajectory=return_trajectory,
                generator=torch.Generator(device=x0.device).manual_seed(0) if spec.stochastic else None)
    res.info.update({"eta": float(eta), "window": tuple(window)})
    return res


@dataclass
class EditResult:
    """Edited images, the intermediate inverted state, and the true NFE of both passes."""

    x: Tensor
    inverted: Tensor
    nfe: int
    nfe_inversion: int
    nfe_generation: int
    info: Dict[str, Any] = field(default_factory=dict)


def class_swap_edit(model: Callable, x_src: Tensor, y_src: Union[Tensor, int], y_tgt: Union[Tensor, int],
                    solver: str = "midpoint", steps: int = 20, inject: int = 0, grid: GridLike = "uniform",
                    guidance: Optional[float] = None, gamma: float = 0.0, eta: float = 0.0,
                    eta_window: Tuple[float, float] = (0.0, 0.25), seed: int = 0) -> EditResult:
    """Class-swap edit: invert ``x_src`` with class ``y_src``, regenerate with ``y_tgt``.

    ``inject = K`` shares the first ``K`` steps of the regeneration with the source trajectory:
    the inversion stops at grid time ``t_K`` and the regeneration starts there (more ``K``, more
    structure kept; ``K = steps`` returns ``x_src`` unchanged at zero cost). Optional RF-Inversion
    controllers: ``gamma`` in the inversion (towards a seeded noise sample), ``eta`` towards
    ``x_src`` on ``eta_window`` in the regeneration. ``guidance`` applies CFG with the target class
    in the regeneration. NFE = inversion + regeneration evaluations (guided rows counted).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(inject, bool) or not isinstance(inject, int) or not 0 <= inject <= steps:
        raise ValueError(f"inject must be an int in [0, steps={steps}], got {inject!r}")
    spec = get_solver(solver)
    if spec.stochastic:
        raise ValueError(f"solver {spec.name!r} is stochastic; class-swap editing inverts with a deterministic solver")
    b = x_src.shape[0]
    ys = torch.full((b,), int(y_src), dtype=torch.long) if not torch.is_tensor(y_src) else y_src.long()
    yt = torch.full((b,), int(y_tgt), dtype=torch.long) if not torch.is_tensor(y_tgt) else y_tgt.long()
    g = make_grid(grid, steps)
    if inject == steps:
        return EditResult(x_src.clone(), x_src.clone(), 0, 0, 0, {"inject": inject, "t_start": 1.0})
    tail = g[inject:]
    t_k = float(tail[0])
    with torch.no_grad():
        if gamma > 0:
            z, _ = initial_noise(x_src.shape, seed, dtype=x_src.dtype, device=x_src.device)
            f_inv = ControlledVelocity(model, z, gamma, target_time=0)
        else:
            f_inv = model
        inv = solve(f_inv, x_src, tail.flip(0), spec.name, cond={"y": ys})
        base = _cfg(model, guidance)
        f_gen = ControlledVelocity(base, x_src, eta, target_time=1, window=eta_window) if eta > 0 else base
        gen = solve(f_gen, inv.x, tail, spec.name, cond={"y": yt})
    return EditResult(gen.x, inv.x, inv.nfe + gen.nfe, inv.nfe, gen.nfe,
                      {"inject": inject, "t_start": t_k, "solver": spec.name, "steps": steps,
                       "gamma": gamma, "eta": eta, "guidance": guidance})


def inversion_roundtrip(model: Callable, x1: Tensor, solver: str, steps: int, cond: Optional[Dict[str, Any]] = None,
                        grid: GridLike = "uniform") -> Tuple[Tensor, int]:
    """``sample(invert(x1))`` with the same solver and steps both ways; returns (reconstruction, total NFE)."""
    with torch.no_grad():
        inv = invert(model, x1, solver=solver, steps=steps, grid=grid, cond=cond)
        back = sample(model, inv.x, solver=solver, steps=steps, grid=grid, cond=cond)
    return back.x, inv.nfe + back.nfe
