"""Sampling and inversion: ``sample`` integrates noise (t=0) to data (t=1), ``invert`` goes back.

Every solver is a coroutine that yields the ``(x, t)`` it needs and receives the velocity
(:mod:`.protocol`); one driver runs them all. They share one registry (``available()``) and one
NFE count. ``sample`` accepts any velocity callable ``v = model(x, t, **cond)``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from ..grids import GridLike, make_grid, validate_grid
from ..paths import PathLike, get_path
from .base import SOLVERS, CountedVelocity, NonFiniteError, SampleResult, SolverSpec, register_solver
from . import ode  # noqa: F401  (registers euler, midpoint, heun, rk4)
from . import dpm  # noqa: F401  (registers dpm++1/2s/3s/2m/3m)
from . import unipc  # noqa: F401  (registers unipc, unipc-bh1, unipc-bh2)
from . import deis  # noqa: F401  (registers deis, deis-pc)
from . import multistep  # noqa: F401  (registers ab2, ab3, ab4, plms/pndm, hb, ghvb, heun_pc/flowturbo)
from . import adaptive  # noqa: F401  (registers dopri5)
from . import sde  # noqa: F401  (registers sde/euler_maruyama)
from . import ipndm  # noqa: F401  (registers ipndm)
from .guidance import ClassifierFreeGuidance
from .protocol import Eval, State, Stepper, drive, trace
from .noise import initial_noise
from ..registry import UnknownNameError

AUTO = "auto"  # not a registered solver: ``sample``/``invert`` resolve it to one (:mod:`.auto`)

__all__ = ["sample", "invert", "available", "choices", "resolve_auto", "AUTO", "get_solver", "SampleResult", "NonFiniteError",
           "register_solver", "SolverSpec", "ClassifierFreeGuidance", "solve", "initial_noise", "CountedVelocity",
           "Eval", "State", "Stepper", "drive", "trace"]


def available() -> list:
    """Solver names a user can pass as ``solver=``."""
    return SOLVERS.names()


def choices() -> list:
    """What ``sample``/``invert`` accept as ``solver=``: every registered solver and ``"auto"`` (the
    best fixed solver for the NFE budget ``steps``, measured: :mod:`straightflow.solvers.auto`)."""
    return sorted(available() + [AUTO])


def get_solver(name: str) -> SolverSpec:
    if _is_auto(name):
        raise ValueError('"auto" is not one solver: sample(..., solver="auto", steps=k) resolves it per NFE budget k '
                         "(straightflow.solvers.resolve_auto); give a registered name here: " + ", ".join(available()))
    return SOLVERS.get(name)


def _is_auto(name) -> bool:
    return isinstance(name, str) and name.strip().lower() == AUTO


def _canonical(name: str) -> str:
    """The registered name, else an error listing :func:`choices` (``auto`` included)."""
    try:
        return SOLVERS.canonical(name)
    except UnknownNameError:
        raise UnknownNameError(f"unknown solver {name!r}; valid names: {', '.join(choices())}") from None


def resolve_auto(nfe: int, grid: GridLike = "uniform", options: Optional[Dict[str, Any]] = None):
    """``(solver name, steps, options)`` that ``solver="auto"`` runs for the NFE budget ``nfe``: the measured
    choice of :data:`straightflow.solvers.auto.AUTO_TABLE` (above the table: its largest entry) at the largest
    step count whose exact cost is within ``nfe`` (exactly ``nfe`` for every budget the table lists).
    The choice was measured on the uniform grid with the solver's own options, so other grids and options
    are refused."""
    from .auto import auto_choice

    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise ValueError(f'solver="auto" takes steps = the NFE budget (an integer), got {nfe!r}')
    if _is_explicit(grid) or str(grid).lower() != "uniform":
        raise ValueError('solver="auto" was measured on the uniform grid: pass a named solver to use grid='
                         f"{grid if isinstance(grid, str) else 'a tensor'}")
    if options:
        raise ValueError(f'solver="auto" picks its solver\'s options itself; got {sorted(options)} (name a solver)')
    name, opts = auto_choice(nfe)
    spec = SOLVERS.get(name)
    steps = spec.steps_for_nfe(nfe, **opts)
    if spec.nfe(steps, **opts) > nfe:
        raise ValueError(f'solver="auto" cannot meet NFE {nfe}: one {name} step costs {spec.nfe(1, **opts)}')
    return name, steps, opts


def solve(
    model: Callable,
    x: Tensor,
    grid: Tensor,
    solver: str = "euler",
    cond: Optional[Dict[str, Any]] = None,
    return_trajectory: bool = False,
    check_finite: bool = True,
    generator: Optional[torch.Generator] = None,
    path: PathLike = "linear",
    callback: Optional[Callable[[int, float, Tensor], None]] = None,
    **options,
) -> SampleResult:
    """Integrate ``dx/dt = model(x, t, **cond)`` along a validated grid (either direction).

    ``path`` is the affine path the model was trained on; solvers that need it (DPM-Solver++,
    UniPC, SDE samplers) convert the velocity to data/noise predictions with it. ``callback(i, t,
    x)`` sees the state after every step (e.g. a progress bar for a long solve); ``sample`` and
    ``invert`` pass it through.
    """
    spec = SOLVERS.get(solver)
    g = validate_grid(grid)
    # NaN/Inf: the loop itself runs unchecked (a per-call check is a full extra pass over the
    # batch and a host sync per evaluation). A non-finite value persists in the state, so the
    # final state is checked once; only then is the solve replayed, from the same generator
    # state, with every evaluation checked, to name the step and time where it first appeared.
    f = CountedVelocity(model, cond, check_finite=False)
    ts = g.tolist()
    traj = [x] if return_trajectory else None
    cb = (lambda i, t, xi: traj.append(xi)) if return_trajectory else None
    if callback is not None:
        cb = callback if cb is None else (lambda i, t, xi, _a=cb, _b=callback: (_a(i, t, xi), _b(i, t, xi)))
    if spec.stochastic:
        options.setdefault("generator", generator)
    if spec.needs_path:
        options.setdefault("path", get_path(path))
    gen = options.get("generator")
    gen_state = gen.get_state() if (check_finite and gen is not None) else None
    out = spec.run(f, x, ts, callback=cb, **options)
    if check_finite and not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        if gen_state is not None:
            gen.set_state(gen_state)
        spec.run(CountedVelocity(model, cond, check_finite=True), x, ts, **options)
        raise NonFiniteError(f"solver {spec.name!r} produced NaN/Inf in its final state")
    return SampleResult(
        x=out, nfe=f.nfe, times=g,
        trajectory=torch.stack(traj) if traj is not None else None,
        info={"solver": spec.name, "steps": len(ts) - 1},
    )


def sample(
    model: Callable,
    noise: Union[Tensor, Sequence[int]],
    solver: Union[str, Any] = "euler",
    steps: Optional[int] = None,
    grid: GridLike = "uniform",
    guidance: Optional[Union[float, ClassifierFreeGuidance]] = None,
    cond: Optional[Dict[str, Any]] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
    t0: float = 0.0,
    t1: float = 1.0,
    grid_options: Optional[Dict[str, Any]] = None,
    check_finite: bool = True,
    path: PathLike = "linear",
    **solver_options,
) -> SampleResult:
    """Generate data from noise: integrate from ``t0`` (noise) to ``t1`` (data).

    ``noise`` is a tensor ``(B, ...)`` or a shape (drawn with ``seed``/``generator``). ``grid`` is a
    grid name (``straightflow.grids.available()``) with ``steps``, or an explicit increasing tensor
    of times. ``path`` is the path the model was trained on (used by solvers that need it). ``guidance`` (a float scale or a :class:`ClassifierFreeGuidance`) needs ``cond={"y": ...}``
    and a model with a null class. Returns a :class:`SampleResult` with ``.x``, ``.nfe`` (velocity
    evaluations per sample, guided rows included) and ``.trajectory`` when asked. ``steps``
    defaults to 8.

    ``solver="auto"``: ``steps`` is the NFE budget ``k`` (required), and the solver measured best at ``k``
    among the fixed ones runs on the uniform grid (:func:`resolve_auto`; ``docs/solvers-auto.md`` is the
    table); ``result.nfe == k`` for every budget in the table (k = 2..12), and above it the NFE-12 choice
    spends exactly ``k`` as well when its cost allows.

    ``solver`` may also be a calibration (``straightflow.optimize.calibrate(...)``, or any object
    with a ``sample(model, noise, cond=, guidance=, check_finite=)`` method): it fixes its own
    times and NFE and refuses a model, shape or guidance scale it was not computed for.
    """
    if not isinstance(solver, str):
        return _sample_calibrated(solver, model, noise, steps, grid, guidance, cond, seed, generator,
                                  return_trajectory, check_finite, solver_options)
    budget = steps if _is_auto(solver) else None
    solver, steps, solver_options = _resolve(solver, steps, grid, solver_options)
    _canonical(solver)  # fail on a bad name before any work
    if steps is None and not _is_explicit(grid):
        steps = 8
    x, _ = initial_noise(noise, seed, generator)
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    g = make_grid(grid, None if _is_explicit(grid) else steps, t0=t0, t1=t1, **(grid_options or {}))
    if float(g[0]) > float(g[-1]):
        raise ValueError("sample() integrates towards the data (increasing t); use invert() for data -> noise")
    velocity = model if guidance is None else (
        guidance if isinstance(guidance, ClassifierFreeGuidance) else ClassifierFreeGuidance(model, float(guidance)))
    res = solve(velocity, x, g, solver, cond=cond, return_trajectory=return_trajectory,
                check_finite=check_finite, generator=generator, path=path, **solver_options)
    if budget is not None:
        res.info["auto"] = {"budget": int(budget), "solver": res.info["solver"], "steps": res.info["steps"]}
    return res


def _resolve(solver: str, steps, grid, solver_options):
    """``solver="auto"`` -> the measured solver for the NFE budget ``steps`` (:mod:`.auto`); others unchanged."""
    if not _is_auto(solver):
        return solver, steps, solver_options
    if steps is None:
        raise ValueError('solver="auto" needs steps = the NFE budget (an integer >= 2)')
    return resolve_auto(steps, grid, solver_options)


def _sample_calibrated(cal, model, noise, steps, grid, guidance, cond, seed, generator, return_trajectory,
                       check_finite, solver_options) -> SampleResult:
    run = getattr(cal, "sample", None)
    if not callable(run):
        raise TypeError(f"solver must be a solver name ({', '.join(choices())}) or a calibration, "
                        f"got {type(cal).__name__}")
    nfe = getattr(cal, "nfe", None)
    budget = getattr(cal, "budget", None)
    if steps is not None and nfe is not None and int(steps) not in (int(nfe), int(budget if budget is not None else nfe)):
        raise ValueError(f"this calibration runs at NFE {nfe}; got steps={steps} (leave steps unset)")
    if _is_explicit(grid) or grid != "uniform" or solver_options or return_trajectory:
        raise ValueError("a calibration fixes its own times and update: grid=, solver options and "
                         "return_trajectory do not apply")
    if isinstance(guidance, ClassifierFreeGuidance):
        raise ValueError("give a calibration the guidance scale as a number (it must be the scale it was fitted at)")
    x, _ = initial_noise(noise, seed, generator)
    return run(model, x, cond=cond, guidance=guidance, check_finite=check_finite)


def _is_explicit(grid) -> bool:
    return torch.is_tensor(grid) or isinstance(grid, (list, tuple))


def invert(
    model: Callable,
    x1: Tensor,
    solver: str = "euler",
    steps: Optional[int] = 8,
    grid: GridLike = "uniform",
    cond: Optional[Dict[str, Any]] = None,
    return_trajectory: bool = False,
    grid_options: Optional[Dict[str, Any]] = None,
    check_finite: bool = True,
    path: PathLike = "linear",
    **solver_options,
) -> SampleResult:
    """Map data back to noise: integrate the same ODE from t = 1 to t = 0 on the reversed grid.

    With a deterministic solver, ``sample(model, invert(model, x).x)`` reconstructs ``x`` up to the
    solver's discretisation error (which falls with its order). ``solver="auto"``: ``steps`` is the NFE
    budget, as in :func:`sample`.
    """
    budget = None
    if _is_auto(solver):
        budget = steps
        solver, steps, solver_options = resolve_auto(steps, grid, solver_options)
    spec = SOLVERS.get(_canonical(solver))
    if spec.stochastic:
        raise ValueError(f"solver {spec.name!r} is stochastic; inversion needs a deterministic solver")
    if not torch.is_tensor(x1) or not x1.is_floating_point():
        raise TypeError("x1 must be a floating-point tensor")
    g = make_grid(grid, None if _is_explicit(grid) else steps, **(grid_options or {}))
    if float(g[0]) < float(g[-1]):
        g = g.flip(0)
    res = solve(model, x1, g, solver, cond=cond, return_trajectory=return_trajectory,
                check_finite=check_finite, path=path, **solver_options)
    if budget is not None:
        res.info["auto"] = {"budget": int(budget), "solver": res.info["solver"], "steps": res.info["steps"]}
    return res
