"""k-rectified flow: retrain a flow on its teacher's own (noise, sample) pairs.

Reflow (Liu et al. 2022, "Flow Straight and Fast"): given pairs ``(x0, x1 = ODE_teacher(x0))``,
minimise ``E || v(x_t, t) - (alpha'(t) x1 + sigma'(t) x0) ||`` with ``x_t = alpha x1 + sigma x0``.
The new flow's trajectories are straighter (k-RF after k - 1 reflows), so few-step Euler works.

- ``improved=True``: "Improving the Training of Rectified Flows" (Lee et al. 2024): U-shaped
  training times ``p(t) ~ e^{a t} + e^{a (1 - t)}`` (a = 4), pseudo-Huber loss with the
  ``1/t``-style weighting ``w = 1 / (1 - t + eps)`` (their t is our ``1 - t``), initialised from
  the 1-RF. Each part can be set on its own (``time_dist=``, ``loss=``, ``init=``) for the
  ablation. Their few-step sampler that re-noises with the initial noise is :func:`sample_renoise`.
- ``anneal=``: SlimFlow's Annealing Reflow (Zhu et al. 2024): the stored noise is mixed with
  fresh noise, ``x0' = sqrt(1 - beta^2) x0 + beta eps``, with ``beta`` decayed from 1 to 0 over
  the first ``warmup`` steps (linear by default, as SlimFlow's reference runs; or cosine); early
  training is plain 1-RF on (noise, sample) marginals, late training is reflow. This lets a
  student that does not share the teacher's architecture start from scratch.
- Beyond the linear path (Rectified Diffusion, Wang et al. 2024): ``path="vp"`` or ``"cosine"``
  trains the k-RF on the teacher's own curved path from its pairs; what matters is that the
  ODE is first order (its data prediction ``x1_hat(x_t, t)`` constant along a trajectory), not
  that it is straight. :func:`straightness_report` measures both.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import checkpoint
from ..checkpoint import run_info
from ..flow import Flow
from ..grids import make_grid
from ..io import FilePath
from ..metrics import straightness
from ..models import sample_shape
from ..paths import get_path
from ..solvers import SampleResult, initial_noise, sample
from ..solvers.base import CountedVelocity
from ..solvers.guidance import ClassifierFreeGuidance
from ..train import STATE_FILE, TrainResult, TrainSettings, read_train_state, train
from .pairs import load_pairs

__all__ = ["reflow", "make_objective", "AnnealSchedule", "AnnealedReflow", "sample_renoise",
           "straightness_report", "first_order_deviation", "IMPROVED_TIME_DIST", "IMPROVED_LOSS"]


IMPROVED_TIME_DIST: Dict[str, Any] = {"name": "u_shaped", "a": 4.0}
IMPROVED_LOSS: Dict[str, Any] = {"name": "pseudo_huber", "weighting": "inv_noise"}


# ----------------------------------------------------------------------------- annealing


@dataclass
class AnnealSchedule:
    """``beta(k)`` for training step ``k`` (0-based): 1 -> 0 over ``warmup`` steps, then 0.

    ``linear``: ``beta0 (1 - min(1, k / warmup))``; ``cosine``: ``beta0 (1 + cos(pi min(1, k / warmup))) / 2``.
    """

    warmup: int
    kind: str = "linear"
    beta0: float = 1.0

    KINDS = ("linear", "cosine")

    def __post_init__(self) -> None:
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"anneal warmup must be an int >= 1 (steps), got {self.warmup!r}")
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown anneal schedule {self.kind!r}; valid: {', '.join(self.KINDS)}")
        if not 0.0 <= float(self.beta0) <= 1.0:
            raise ValueError(f"anneal beta0 must be in [0, 1], got {self.beta0}")
        self.beta0 = float(self.beta0)

    def __call__(self, k: int) -> float:
        p = min(1.0, max(0, k) / self.warmup)
        if self.kind == "linear":
            return self.beta0 * (1.0 - p)
        return self.beta0 * 0.5 * (1.0 + math.cos(math.pi * p))

    def config(self) -> Dict[str, Any]:
        return {"warmup": self.warmup, "kind": self.kind, "beta0": self.beta0}

    @classmethod
    def from_spec(cls, spec: Any, steps: int) -> Optional["AnnealSchedule"]:
        """None/False: off. True: linear over the first half of ``steps``. int: warmup steps.
        dict: ``{"warmup": ..., "kind": ..., "beta0": ...}``. An AnnealSchedule passes through."""
        if spec is None or spec is False:
            return None
        if isinstance(spec, cls):
            return spec
        if spec is True:
            return cls(max(1, steps // 2))
        if isinstance(spec, int):
            return cls(spec)
        if isinstance(spec, dict):
            d = dict(spec)
            d.setdefault("warmup", max(1, steps // 2))
            return cls(**d)
        raise ValueError(f"anneal must be None, True, an int (warmup steps), a dict or an AnnealSchedule, got {spec!r}")


class AnnealedReflow(Flow):
    """Reflow objective with SlimFlow's annealed source noise ``sqrt(1 - beta^2) x0 + beta eps``.

    Design: the objective counts its own :meth:`loss` calls (the trainer calls it once per
    step), so ``beta`` follows the training step without a trainer hook. :func:`reflow` sets
    ``calls`` from the saved training state when it resumes, so a resumed run continues the
    schedule where it stopped. ``Flow``'s ``coupling`` must be ``"pairs"``.
    """

    def __init__(self, model: Callable, path="linear", time_dist="uniform", loss="mse", coupling="pairs",
                 cond_dropout: float = 0.0, anneal: Any = None, start_step: int = 0) -> None:
        super().__init__(model, path=path, time_dist=time_dist, loss=loss, coupling=coupling, cond_dropout=cond_dropout)
        if not getattr(self.coupling, "needs_pairs", False):
            raise ValueError(f"annealing reflow needs the 'pairs' coupling, got {self.coupling.name!r}")
        sched = anneal if isinstance(anneal, AnnealSchedule) else AnnealSchedule(**anneal) if isinstance(anneal, dict) else None
        if sched is None:
            raise ValueError("AnnealedReflow needs anneal= an AnnealSchedule or its config dict")
        self.schedule = sched
        self.calls = int(start_step)

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "anneal": self.schedule.config()}

    @property
    def beta(self) -> float:
        """``beta`` the next :meth:`loss` call will use."""
        return self.schedule(self.calls)

    def loss(self, x1: Tensor, cond=None, x0: Optional[Tensor] = None, generator=None, model=None) -> Tensor:
        if x0 is None:
            raise ValueError("annealing reflow needs stored noise: pass x0 (a PairDataset)")
        b = self.schedule(self.calls)
        self.calls += 1
        if b > 0:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x0 = math.sqrt(1.0 - b * b) * x0 + b * eps
        return super().loss(x1, cond=cond, x0=x0, generator=generator, model=model)


# ----------------------------------------------------------------------------- objective


def make_objective(
    model: nn.Module,
    *,
    improved: bool = False,
    path: Any = "linear",
    time_dist: Any = None,
    loss: Any = None,
    anneal: Any = None,
    steps: int = 1,
    cond_dropout: float = 0.0,
    start_step: int = 0,
) -> Flow:
    """The reflow objective: a :class:`Flow` with the ``"pairs"`` coupling (or an
    :class:`AnnealedReflow`). ``improved`` switches the defaults of ``time_dist`` (U-shaped)
    and ``loss`` (pseudo-Huber, inv_noise weighting); explicit values win."""
    td = time_dist if time_dist is not None else (IMPROVED_TIME_DIST if improved else "uniform")
    ls = loss if loss is not None else (IMPROVED_LOSS if improved else "mse")
    sched = AnnealSchedule.from_spec(anneal, steps)
    if sched is None:
        return Flow(model, path=path, time_dist=td, loss=ls, coupling="pairs", cond_dropout=cond_dropout)
    return AnnealedReflow(model, path=path, time_dist=td, loss=ls, coupling="pairs", cond_dropout=cond_dropout,
                          anneal=sched, start_step=start_step)


def _as_teacher(teacher: Any) -> Any:
    if isinstance(teacher, (str, os.PathLike)):
        model = checkpoint.load(teacher)
        model.run_config.setdefault("run_dir", str(teacher))
        return model
    return teacher


def _init_model(teacher: Any, init: Any, seed: int) -> nn.Module:
    from ..models import build_model

    if isinstance(init, nn.Module):
        model = init
    elif isinstance(init, dict):
        model = build_model(init, seed=seed)
    elif init == "teacher":
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"init='teacher' needs an nn.Module teacher, got {type(teacher).__name__}; "
                             "pass init='scratch' with a model, init=<nn.Module> or init=<model config dict>")
        model = copy.deepcopy(teacher)
    elif init == "scratch":
        cfg = getattr(teacher, "config", None)
        if not isinstance(cfg, dict) or "name" not in cfg:
            raise ValueError("init='scratch' rebuilds the teacher's architecture from teacher.config; this teacher has "
                             "none: pass init=<model config dict> or init=<nn.Module>")
        model = build_model(cfg, seed=seed)
    else:
        raise ValueError(f"init must be 'teacher', 'scratch', an nn.Module or a model config dict, got {init!r}")
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "run_config"):
        try:
            del model.run_config
        except AttributeError:
            pass
    return model.train()


def _default_path(path: Any, pairs: Any, teacher: Any) -> Any:
    if path is not None:
        return path
    info = getattr(pairs, "info", None) or {}
    if info.get("path"):
        return info["path"]
    rc = getattr(teacher, "run_config", None)
    return run_info(rc).path if rc else "linear"


def default_ema(steps: int) -> float:
    """The EMA decay a k-RF of ``steps`` steps trains with unless told: ``min(0.999, 1 - 20 / steps)``, so
    the EMA forgets the initial weights within the run."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return max(0.0, min(0.999, 1.0 - 20.0 / steps))


def reflow(
    teacher: Any,
    pairs: Any,
    steps: Optional[int] = None,
    *,
    out: Optional[FilePath] = None,
    improved: bool = False,
    init: Any = "teacher",
    path: Any = None,
    time_dist: Any = None,
    loss: Any = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    anneal: Any = None,
    cond_dropout: float = 0.0,
    settings: Optional[TrainSettings] = None,
    **train_kw: Any,
) -> TrainResult:
    """Train a k-RF on stored pairs (coupling ``"pairs"``) for ``steps`` steps.

    ``teacher``: the (k-1)-RF (an ``nn.Module``, a run directory, or any velocity callable when
    ``init`` is not ``"teacher"``). ``pairs``: a :class:`~straightflow.coupling.PairDataset` or a
    directory from :func:`~straightflow.straighten.pairs.generate_pairs`. ``init``: ``"teacher"``
    (a deep copy of the teacher, the default and the improved recipe), ``"scratch"`` (the
    teacher's architecture, fresh weights), an ``nn.Module`` or a model config dict (e.g. a
    smaller SlimFlow student). ``path``: the path to train on; None means the path the pairs
    were generated on (the teacher's; Rectified Diffusion), else linear. ``improved``,
    ``time_dist``, ``loss``, ``anneal``: see the module docstring. ``ema_decay`` defaults to
    ``min(0.999, 1 - 20 / steps)`` so the EMA forgets the initial weights within the run; other
    ``train_kw`` go to :func:`straightflow.train` (``warmup``, ``grad_clip``, ``ckpt_every``,
    ``device``, ``progress``, ...). The result has ``.objective`` (the Flow) and ``.cost``
    (teacher NFE spent on the pairs, training steps and pair-rows seen). ``settings``: the training
    settings as one value (a :class:`~straightflow.train.TrainSettings`, e.g. the command line's recipe),
    replacing ``steps``, ``batch_size``, ``lr``, ``seed`` and the EMA default.
    """
    if settings is not None:
        if not isinstance(settings, TrainSettings):
            raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
        if steps is not None and steps != settings.steps:
            raise ValueError(f"steps={steps} differs from settings.steps={settings.steps}; pass one of them")
        steps, batch_size, lr, seed = settings.steps, settings.batch_size, settings.lr, settings.seed
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    teacher = _as_teacher(teacher)
    ds = load_pairs(pairs) if isinstance(pairs, (str, os.PathLike)) else pairs
    if not (hasattr(ds, "x0") and hasattr(ds, "x1")):
        raise TypeError(f"pairs must be a PairDataset or a pairs directory, got {type(ds).__name__}")
    model = _init_model(teacher, init, seed)
    start = 0
    if out is not None and (Path(out) / STATE_FILE).is_file():
        start = int(read_train_state(Path(out) / STATE_FILE)[1]["step"])
    flow = make_objective(model, improved=improved, path=_default_path(path, ds, teacher), time_dist=time_dist,
                          loss=loss, anneal=anneal, steps=steps, cond_dropout=cond_dropout, start_step=start)
    info = dict(getattr(ds, "info", None) or {})
    rc = getattr(teacher, "run_config", None) or {}
    k_prev = int((rc.get("reflow") or {}).get("k", 1))
    extra = dict(train_kw.pop("extra_config", None) or {})
    extra.setdefault("reflow", {
        "k": k_prev + 1, "improved": bool(improved),
        "init": init if isinstance(init, str) else type(init).__name__,
        "anneal": flow.schedule.config() if isinstance(flow, AnnealedReflow) else None,
        "pairs": {key: info.get(key) for key in ("n", "solver", "steps", "grid", "guidance", "seed",
                                                 "nfe_per_pair", "total_nfe", "recipe_sha256")},
        "teacher": {"class": type(teacher).__name__, "run": rc.get("run_dir")},
    })
    if "data_source" in rc:
        extra.setdefault("data_source", rc["data_source"])
    if settings is None:
        train_kw.setdefault("ema_decay", default_ema(steps))
        res = train(flow, ds, steps, out=out, batch_size=batch_size, lr=lr, seed=seed, extra_config=extra, **train_kw)
    else:
        res = train(flow, ds, out=out, settings=settings, extra_config=extra, **train_kw)
    res.objective = flow
    res.cost = {"pair_nfe": int(info.get("total_nfe", 0)), "nfe_per_pair": info.get("nfe_per_pair"),
                "train_steps": int(steps), "pair_rows_seen": int(steps) * int(batch_size)}
    return res


# ----------------------------------------------------------------------------- sampling


def sample_renoise(
    model: Callable,
    noise: Tensor,
    steps: int,
    *,
    path: Any = "linear",
    grid: Any = "uniform",
    cond: Optional[Dict[str, Any]] = None,
    guidance: Optional[float] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Few-step sampler that re-noises with the initial noise (Lee et al. 2024, Sec. "sampler").

    At each step predict ``x1_hat = velocity_to_x1(v(x_t, t))`` (on the linear path
    ``x_t + (1 - t) v``) and jump to ``x_{t'} = alpha(t') x1_hat + sigma(t') x0`` with the
    ORIGINAL noise ``x0`` instead of the Euler update. One step equals one Euler step.
    NFE = ``steps`` (x2 with guidance).
    """
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    p = get_path(path)
    g = make_grid(grid, None if not isinstance(grid, str) else steps)
    ts = g.tolist()
    velocity = ClassifierFreeGuidance(model, float(guidance)) if guidance is not None else model
    f = CountedVelocity(velocity, cond)
    x0 = noise
    x = noise
    traj = [x] if return_trajectory else None
    linear = p.name == "linear"
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        v = f(x, t, i)
        if linear:
            x1_hat = x + (1.0 - t) * v
            x = x1_hat if tn == 1.0 else tn * x1_hat + (1.0 - tn) * x0
        else:
            tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            x1_hat = p.velocity_to_x1(v, x, tb)
            tnb = torch.full((x.shape[0],), tn, dtype=x.dtype, device=x.device)
            a, s, _, _ = p.coefficients(tnb, x)
            x = a * x1_hat + s * x0
        if traj is not None:
            traj.append(x)
    return SampleResult(x=x, nfe=f.nfe, times=g, trajectory=torch.stack(traj) if traj is not None else None,
                        info={"solver": "renoise", "steps": len(ts) - 1})


# ----------------------------------------------------------------------------- measuring


def first_order_deviation(model: Callable, trajectory: Tensor, times: Tensor, path: Any = "linear",
                          cond: Optional[Dict[str, Any]] = None) -> float:
    """How far a flow is from first order along its own trajectories (Rectified Diffusion).

    ``D = sum_i |dt_i| mean_b || x1_hat(x_{t_i}, t_i) - x_T ||^2`` over the grid points before the
    end, with ``x1_hat`` the path's data prediction from the velocity. ``D = 0`` iff every state's
    data prediction already equals the trajectory's endpoint, i.e. the ODE solution is
    ``x_t = alpha(t) x1 + sigma(t) x0_hat`` with constant predictions, straight or not. On the
    linear path it vanishes exactly when the trajectory is straight at constant speed.
    """
    p = get_path(path)
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    xT = trajectory[-1]
    total = 0.0
    with torch.no_grad():
        for i in range(len(t) - 1):
            x = trajectory[i]
            tb = torch.full((x.shape[0],), float(t[i]), dtype=x.dtype, device=x.device)
            v = model(x, tb, **(cond or {}))
            x1_hat = p.velocity_to_x1(v, x, tb)
            dev = (x1_hat - xT).reshape(x.shape[0], -1).double().pow(2).sum(1).mean()
            total += abs(float(t[i + 1] - t[i])) * float(dev)
    return total


def straightness_report(
    model: Callable,
    n: int = 1024,
    steps: int = 32,
    seed: int = 0,
    *,
    path: Any = "linear",
    solver: str = "euler",
    shape: Optional[Sequence[int]] = None,
    labels: Any = "auto",
    guidance: Optional[float] = None,
) -> Dict[str, float]:
    """Straightness (:func:`straightflow.metrics.straightness`) and first-order deviation
    (:func:`first_order_deviation`) of ``n`` trajectories from seeded noise, ``steps`` steps of
    ``solver``. ``labels="auto"`` cycles through the classes of a class-conditional model.
    Returns ``{"straightness", "first_order", "nfe", "n", "steps", "path"}``."""
    shp = sample_shape(model, shape)
    dev = next((p.device for p in model.parameters()), torch.device("cpu")) if isinstance(model, nn.Module) else torch.device("cpu")
    x0, _ = initial_noise((n, *shp), seed, device=dev)
    nc = getattr(model, "num_classes", None)
    cond = None
    if isinstance(labels, str) and labels == "auto":
        if nc:
            cond = {"y": (torch.arange(n) % int(nc)).to(dev)}
    elif labels is not None:
        cond = {"y": torch.as_tensor(labels).long().to(dev)}
    velocity = ClassifierFreeGuidance(model, float(guidance)) if guidance is not None else model
    p = get_path(path)
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            res = sample(velocity, x0, solver=solver, steps=steps, cond=cond, path=p, return_trajectory=True)
            s = straightness(res.trajectory, res.times)
            fo = first_order_deviation(velocity, res.trajectory, res.times, path=p, cond=cond)
    finally:
        if was_training:
            model.train()
    return {"straightness": float(s), "first_order": float(fo), "nfe": int(res.nfe), "n": int(n),
            "steps": int(steps), "path": p.name}
