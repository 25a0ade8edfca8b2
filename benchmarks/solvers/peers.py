"""The peer libraries' samplers on straightflow's velocity convention (diffusers flow-matching schedulers,
torchdiffeq, flow_matching, rectified-flow), each a :class:`Peer` whose NFE is counted by the caller."""
from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Peer", "make_peers"]


@dataclass
class Peer:
    """A peer method: ``run(velocity, x0, steps) -> x1`` with ``velocity(x, t)`` counted."""

    name: str
    library: str
    nfe_of: Callable[[int], int]  # NFE of ``steps`` steps (as documented; checked by counting)
    run: Callable[[Callable, Tensor, int], Tensor]
    note: str = ""

    def steps_for(self, nfe: int) -> int | None:
        for s in range(max(1, nfe), 0, -1):
            if self.nfe_of(s) == nfe:
                return s
        return None


def _diffusers_loop(make: Callable, exact_sigmas: bool) -> Callable[[Callable, Tensor, int], Tensor]:
    def run(vel: Callable, x: Tensor, steps: int) -> Tensor:
        sched = make()
        sched.set_timesteps(steps)
        if exact_sigmas:  # sigma 1 -> 0 uniform (the shipped flow sigmas start at 0.999)
            sig = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
            sched.sigmas = sig.to(torch.float32)
            sched.timesteps = (sig[:-1] * sched.config.num_train_timesteps).round().long()
        for t in sched.timesteps:
            i = 0 if sched.step_index is None else sched.step_index
            sigma = float(sched.sigmas[i])
            out = -vel(x, 1.0 - sigma)
            x = sched.step(out, t, x, return_dict=False)[0]
        return x

    return run


def _diffusers_peers() -> tuple[list[Peer], dict[str, Any]]:
    import diffusers
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=2)
    cfg = "flow_prediction, use_flow_sigmas, flow_shift=1, solver_order=2"

    def dpm():
        return DPMSolverMultistepScheduler(**flow)

    def unipc():
        return UniPCMultistepScheduler(**flow)

    peers = [
        Peer("diffusers FlowMatchEuler", "diffusers", lambda s: s,
             _diffusers_loop(FlowMatchEulerDiscreteScheduler, False), "shipped sigmas 1, ..., 0.001, 0"),
        Peer("diffusers FlowMatchHeun", "diffusers", lambda s: 2 * s - 1,
             _diffusers_loop(FlowMatchHeunDiscreteScheduler, False), "2N-1 calls; last step Euler"),
        # DPM's shipped flow sigmas start at 0.999 (an O(1e-3) error floor): the exact grid is used
        Peer("diffusers DPM++2M", "diffusers", lambda s: s, _diffusers_loop(dpm, True),
             cfg + "; sigmas set to the exact uniform grid 1 -> 0"),
        Peer("diffusers UniPC", "diffusers", lambda s: s, _diffusers_loop(unipc, False),
             cfg + "; shipped sigmas (start at 1)"),
    ]
    variants = {  # both sigma grids of the multistep schedulers, for the convergence check
        "diffusers DPM++2M": {"shipped": _diffusers_loop(dpm, False), "exact": _diffusers_loop(dpm, True), "used": "exact"},
        "diffusers UniPC": {"shipped": _diffusers_loop(unipc, False), "exact": _diffusers_loop(unipc, True), "used": "shipped"},
    }
    return peers, {"version": diffusers.__version__, "variants": variants}


def _torchdiffeq_peers() -> tuple[list[Peer], dict[str, Any]]:
    import torchdiffeq
    from torchdiffeq import odeint

    def fixed(method: str):
        def run(vel, x, steps):
            t = torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype)
            return odeint(lambda tt, y: vel(y, tt), x, t, method=method)[-1]

        return run

    peers = [Peer("torchdiffeq euler", "torchdiffeq", lambda s: s, fixed("euler")),
             Peer("torchdiffeq midpoint", "torchdiffeq", lambda s: 2 * s, fixed("midpoint")),
             Peer("torchdiffeq rk4", "torchdiffeq", lambda s: 4 * s, fixed("rk4"), "3/8-rule RK4")]

    def dopri5(vel, x, tol):
        t = torch.tensor([0.0, 1.0], dtype=x.dtype)
        return odeint(lambda tt, y: vel(y, tt), x, t, method="dopri5", rtol=tol, atol=tol)[-1]

    return peers, {"version": getattr(torchdiffeq, "__version__", "?"), "adaptive": dopri5}


def _flow_matching_peers() -> tuple[list[Peer], dict[str, Any]]:
    from importlib.metadata import version

    from flow_matching.solver import ODESolver

    def fixed(method: str):
        def run(vel, x, steps):
            solver = ODESolver(velocity_model=lambda x, t, **kw: vel(x, t))
            grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype)
            return solver.sample(x_init=x, step_size=None, method=method, time_grid=grid)

        return run

    note = "ODESolver (torchdiffeq inside)"
    peers = [Peer("flow_matching euler", "flow_matching", lambda s: s, fixed("euler"), note),
             Peer("flow_matching midpoint", "flow_matching", lambda s: 2 * s, fixed("midpoint"), note),
             Peer("flow_matching rk4", "flow_matching", lambda s: 4 * s, fixed("rk4"), note)]
    return peers, {"version": version("flow_matching")}


def _import_rectified_flow() -> str:
    """Import the ``rectified-flow`` package. Its ``utils`` module imports torchvision for an
    image-grid helper only; when torchvision is absent a placeholder module stands in during the
    import (the samplers never touch it). Returns a note ('' when nothing was needed)."""
    try:
        importlib.import_module("rectified_flow.samplers")
        return ""
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    for k in [k for k in sys.modules if k == "rectified_flow" or k.startswith("rectified_flow.")]:
        del sys.modules[k]
    stub = types.ModuleType("torchvision")
    stub.__path__ = []  # type: ignore[attr-defined]
    sys.modules["torchvision"] = stub
    try:
        importlib.import_module("rectified_flow.samplers")
    finally:
        if sys.modules.get("torchvision") is stub:
            del sys.modules["torchvision"]
    return "torchvision absent: a placeholder module stood in for it at import (used only by an image-grid helper)"


def _rectified_flow_peers() -> tuple[list[Peer], dict[str, Any]]:
    from importlib.metadata import version

    note = _import_rectified_flow()
    from rectified_flow import RectifiedFlow
    from rectified_flow.samplers import rf_samplers_dict

    def make(kind: str):
        def run(vel, x, steps):
            rf = RectifiedFlow(data_shape=tuple(x.shape[1:]), velocity_field=lambda xt, t: vel(xt, t),
                               interp="straight", source_distribution="normal", dtype=x.dtype)
            sampler = rf_samplers_dict[kind](rf, num_steps=steps)
            sampler.sample_loop(x_0=x)
            return sampler.x_t

        return run

    deterministic = [k for k in ("euler", "curved_euler") if k in rf_samplers_dict]
    skipped = [k for k in rf_samplers_dict if k not in deterministic]
    peers = [Peer(f"rectified-flow {k}", "rectified-flow", lambda s: s, make(k),
                  "updates in float32" + (" (= euler on the straight path)" if k == "curved_euler" else ""))
             for k in deterministic]
    return peers, {"version": version("rectified-flow"), "note": note,
                   "stochastic_skipped": skipped}


def make_peers() -> tuple[list[Peer], dict[str, dict[str, Any]], dict[str, str]]:
    """All importable peers; returns (peers, {library: info}, {library: why skipped})."""
    peers: list[Peer] = []
    info: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for lib, fn in (("diffusers", _diffusers_peers), ("torchdiffeq", _torchdiffeq_peers),
                    ("flow_matching", _flow_matching_peers), ("rectified-flow", _rectified_flow_peers)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, i = fn()
            peers += p
            info[lib] = i
        except Exception as e:
            skipped[lib] = f"not importable: {type(e).__name__}: {e}"
    return peers, info, skipped


