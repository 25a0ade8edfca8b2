"""One-step average-velocity models: MeanFlow (JVP target) and SplitMeanFlow (interval splitting).

An average-velocity network ``u(z, r, t)`` predicts the mean velocity of the flow between the
state's time ``t`` and a second time ``r``::

    (t - r) u(z_t, r, t) = integral_r^t v(z_tau, tau) dtau,    so   z_r = z_t + (r - t) u(z_t, r, t).

One network evaluation jumps from noise (``t = 0``) to data (``r = 1``); at ``r = t`` it is the
instantaneous velocity ``v``. Models take the second time as a keyword: ``model(z, t, y, r=r)``
(``straightflow.models.MLP/UNet(..., mean_flow=True)``); ``r=None`` means ``r = t``, so
``straightflow.sample`` integrates such a model as an ordinary velocity field.

Convention mapping. MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling")
and SplitMeanFlow (Guo et al. 2025) write ``z_t = (1 - t) x + t eps`` (``t = 1`` noise),
``v = eps - x`` and ``u(z_t, r, t)`` with ``r < t``. Ours is ``t = 0`` noise: paper times
``(t_p, r_p) = (1 - t, 1 - r)``, ``v_p = -v`` and ``u_p(z, r_p, t_p) = -u(z, r, t)``. Both
sides of the defining identity flip sign together, so it reads the same in our variables
(``(t - r) u = int_r^t v``); the only change is that generation has ``t < r`` (state at the
noisier, earlier time) where the papers have ``t > r``. Differentiating the identity in ``t``
along the flow (``dz/dt = v``, ``r`` fixed) gives MeanFlow's target, again sign-for-sign::

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + d_t u,

a Jacobian-vector product of ``(z, r, t) -> u`` with tangent ``(v, 0, 1)`` (``torch.func.jvp``).
The paper's logit-normal(-0.4, 1) time sampler in its time is logit-normal(+0.4, 1) in ours.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..flow import Flow
from ..coupling import Coupling, get_coupling
from ..grids import GridLike, make_grid
from ..solvers.base import NonFiniteError, SampleResult
from ..time import TimeDistribution, get_time_dist

__all__ = ["MEANFLOW_TIME_DIST", "MeanFlow", "SplitMeanFlow", "meanflow_target", "split_target", "sample_mean", "average_velocity_model",
           "make_objective", "init_from_velocity"]


#: MeanFlow's default (t, r) sampler: the paper's logit-normal(-0.4, 1) mapped to t = 0 noise.
MEANFLOW_TIME_DIST: Dict[str, Any] = {"name": "logit_normal", "m": 0.4, "s": 1.0}


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def average_velocity_model(model: nn.Module) -> nn.Module:
    """Check that ``model`` takes a second time ``r`` (``mean_flow=True``); return it."""
    if hasattr(model, "mean_flow") and not getattr(model, "mean_flow"):
        name = (getattr(model, "config", None) or {}).get("name", type(model).__name__)
        raise ValueError(f"model {name!r} was built without a second time input; build it with mean_flow=True "
                         "(e.g. build_model({'name': 'mlp', 'dim': 2, 'mean_flow': True}))")
    return model


def meanflow_target(u_fn: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor, r: Tensor, t: Tensor,
                    v: Tensor) -> Tuple[Tensor, Tensor]:
    """MeanFlow: ``(u, u_tgt)`` with ``u = u_fn(z, r, t)`` and the stop-gradient target
    ``u_tgt = v - (t - r) * JVP(u_fn, (z, r, t), (v, 0, 1))``.

    ``u`` keeps its graph (the loss backpropagates through it); ``u_tgt`` is detached.
    """
    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    u, dudt = torch.func.jvp(u_fn, (z, r, t), tangents)
    u_tgt = v - _bcast(t - r, z) * dudt
    return u, u_tgt.detach()


def split_target(u_fn: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor, r: Tensor, t: Tensor,
                 lam: Tensor) -> Tensor:
    """SplitMeanFlow's interval-splitting target for ``u(z_t, r, t)`` (no JVP), detached.

    ``s = (1 - lam) t + lam r``; ``u2 = u(z_t, s, t)``; ``z_s = z_t + (s - t) u2`` (one step along
    ``u``); ``u1 = u(z_s, r, s)``; target ``((s - r) u1 + (t - s) u2) / (t - r) = (1 - lam) u1 + lam u2``,
    from ``(t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t)``.
    """
    with torch.no_grad():
        s = (1 - lam) * t + lam * r
        u2 = u_fn(z, s, t)
        zs = z + _bcast(s - t, z) * u2
        u1 = u_fn(zs, r, s)
        return _bcast(1 - lam, z) * u1 + _bcast(lam, z) * u2


class _AverageVelocityObjective:
    """Shared parts: the model, time pairs, coupling, label dropout, config."""

    name = "average_velocity"

    def __init__(self, model: nn.Module, time_dist: Union[str, Dict, TimeDistribution],
                 coupling: Union[str, Dict, Coupling], cond_dropout: float) -> None:
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.model = average_velocity_model(model)
        self.time_dist = get_time_dist(time_dist)
        self.coupling = get_coupling(coupling)
        self.cond_dropout = float(cond_dropout)

    def _base_config(self) -> Dict[str, Any]:
        return {"objective": self.name, "time_dist": self.time_dist.config(), "coupling": self.coupling.config(),
                "cond_dropout": self.cond_dropout}

    def _prepare(self, x1: Tensor, cond: Optional[Dict[str, Tensor]], x0: Optional[Tensor],
                 generator: Optional[torch.Generator], model: Any) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        return Flow.prepare(self, x1, cond, x0, generator, model)  # type: ignore[arg-type]  (same draws as Flow)

    def _times(self, n: int, ratio: float, generator, device, dtype) -> Tuple[Tensor, Tensor]:
        """``(t, r)`` with ``t <= r`` (both from ``time_dist``); a fraction ``1 - ratio`` has ``r = t``."""
        a = self.time_dist.sample(n, generator=generator, device=device, dtype=dtype)
        b = self.time_dist.sample(n, generator=generator, device=device, dtype=dtype)
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        keep = torch.rand(n, generator=generator, device=device) < ratio
        return t, torch.where(keep, r, t)


class MeanFlow(_AverageVelocityObjective):
    """MeanFlow objective (Geng et al. 2025) for ``straightflow.train``.

    ``z_t = t x1 + (1 - t) x0``, ``v = x1 - x0``; ``(t, r)`` are two draws of ``time_dist`` sorted
    so ``t <= r``, and a fraction ``1 - ratio`` of the batch has ``r = t`` (plain flow matching;
    the paper's best ratio of ``r != t`` is 25%). Loss ``sg(w) * ||u(z_t, r, t) - sg(u_tgt)||^2``
    (mean over dimensions) with :func:`meanflow_target` and the adaptive weight
    ``w = 1 / (||.||^2 + c)^p`` (``p = 0``: plain MSE; the paper uses ``p = 1``, ``c = 1e-3``).

    Build the model with a small ``time_scale`` (e.g. ``MLP(..., mean_flow=True, time_scale=10)``):
    the JVP differentiates through the sinusoidal time features, and the default scale 1000 makes
    ``d/dt u`` large and noisy (moons, 800 steps: NFE-1 W2 1.21 at scale 1000, 0.45 at 100,
    0.30 at 10; SplitMeanFlow, which needs no derivative, reads 0.40 / 0.43 / 0.35).

    ``time_dist=None`` is the paper's best sampler, logit-normal(-0.4, 1) in its time, i.e.
    :data:`MEANFLOW_TIME_DIST` = logit-normal(+0.4, 1) in ours (i.i.d. moons, 1200 steps, scale
    1000: NFE-1 W2 0.46 against 1.64 with uniform times).
    """

    name = "meanflow"

    def __init__(self, model: nn.Module, time_dist: Union[str, Dict, TimeDistribution, None] = None,
                 ratio: float = 0.25, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                 coupling: Union[str, Dict, Coupling] = "independent", cond_dropout: float = 0.0) -> None:
        super().__init__(model, MEANFLOW_TIME_DIST if time_dist is None else time_dist, coupling, cond_dropout)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio (fraction of samples with r != t) must be in [0, 1], got {ratio}")
        if adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError(f"adaptive weighting needs p >= 0 and c > 0, got p={adaptive_p}, c={adaptive_c}")
        self.ratio, self.adaptive_p, self.adaptive_c = float(ratio), float(adaptive_p), float(adaptive_c)

    def config(self) -> Dict[str, Any]:
        return {**self._base_config(), "ratio": self.ratio, "adaptive_p": self.adaptive_p,
                "adaptive_c": self.adaptive_c}

    def loss(self, x1: Tensor, cond: Optional[Dict[str, Tensor]] = None, x0: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None, model: Optional[Callable] = None) -> Tensor:
        model = self.model if model is None else model
        x0, x1, cond = self._prepare(x1, cond, x0, generator, model)
        t, r = self._times(x1.shape[0], self.ratio, generator, x1.device, x1.dtype)
        zt = _bcast(t, x1) * x1 + _bcast(1 - t, x1) * x0
        v = x1 - x0
        u, u_tgt = meanflow_target(lambda z, rr, tt: model(z, tt, r=rr, **cond), zt, r, t, v)
        err = (u - u_tgt).pow(2).reshape(u.shape[0], -1).mean(dim=1)
        if self.adaptive_p > 0:
            err = err / (err.detach() + self.adaptive_c).pow(self.adaptive_p)
        return err.mean()


class SplitMeanFlow(_AverageVelocityObjective):
    """SplitMeanFlow objective (Guo et al. 2025, "SplitMeanFlow: Interval Splitting Consistency in
    Few-Step Generative Modeling") for ``straightflow.train``: no JVP.

    A fraction ``boundary_ratio`` of the batch trains the boundary ``u(z_t, t, t) = v`` (flow
    matching with ``v = x1 - x0``, or ``teacher(z_t, t)`` when a teacher is given); the rest draws
    ``t <= r`` and ``lam ~ U(0, 1)`` and regresses ``u(z_t, r, t)`` onto :func:`split_target`
    (stop-gradient). Loss: mean squared error over dimensions and the batch.
    """

    name = "splitmeanflow"

    def __init__(self, model: nn.Module, time_dist: Union[str, Dict, TimeDistribution] = "uniform",
                 boundary_ratio: float = 0.5, teacher: Optional[Callable] = None,
                 coupling: Union[str, Dict, Coupling] = "independent", cond_dropout: float = 0.0) -> None:
        super().__init__(model, time_dist, coupling, cond_dropout)
        if not 0.0 <= boundary_ratio <= 1.0:
            raise ValueError(f"boundary_ratio must be in [0, 1], got {boundary_ratio}")
        self.boundary_ratio = float(boundary_ratio)
        self.teacher = teacher
        if isinstance(teacher, nn.Module):
            self.teacher = teacher.eval().requires_grad_(False)

    def config(self) -> Dict[str, Any]:
        return {**self._base_config(), "boundary_ratio": self.boundary_ratio, "teacher": self.teacher is not None}

    def loss(self, x1: Tensor, cond: Optional[Dict[str, Tensor]] = None, x0: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None, model: Optional[Callable] = None) -> Tensor:
        model = self.model if model is None else model
        x0, x1, cond = self._prepare(x1, cond, x0, generator, model)
        n = x1.shape[0]
        t, r = self._times(n, 1.0, generator, x1.device, x1.dtype)
        boundary = torch.rand(n, generator=generator, device=x1.device) < self.boundary_ratio
        r = torch.where(boundary, t, r)
        lam = torch.rand(n, generator=generator, device=x1.device, dtype=x1.dtype)
        zt = _bcast(t, x1) * x1 + _bcast(1 - t, x1) * x0
        if self.teacher is not None:
            if isinstance(self.teacher, nn.Module):
                self.teacher.to(x1.device)
            with torch.no_grad():
                v = self.teacher(zt, t, **cond)
        else:
            v = x1 - x0

        def u_fn(z, rr, tt):
            return model(z, tt, r=rr, **cond)

        split = split_target(u_fn, zt, r, t, lam)
        target = torch.where(_bcast(boundary, zt), v, split)
        u = u_fn(zt, r, t)
        return (u - target).pow(2).reshape(n, -1).mean(dim=1).mean()


@torch.no_grad()
def sample_mean(model: Callable, noise: Tensor, steps: int = 1, cond: Optional[Dict[str, Any]] = None,
                grid: GridLike = "uniform", return_trajectory: bool = False, check_finite: bool = True) -> SampleResult:
    """Few-step sampling with an average-velocity model: ``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_{i+1}, t_i)``
    on a grid from 0 (noise) to 1 (data). NFE = ``steps`` (one evaluation per step)."""
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor (B, ...)")
    explicit = torch.is_tensor(grid) or isinstance(grid, (list, tuple))
    if not explicit and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    g = make_grid(grid, None if explicit else steps)
    if float(g[0]) > float(g[-1]):
        raise ValueError("sample_mean integrates towards the data (increasing t)")
    cond = dict(cond or {})
    x = noise
    ts = g.tolist()
    traj = [x] if return_trajectory else None
    nfe = 0
    for i in range(len(ts) - 1):
        t = torch.full((x.shape[0],), ts[i], dtype=x.dtype, device=x.device)
        r = torch.full_like(t, ts[i + 1])
        u = model(x, t, r=r, **cond)
        nfe += 1
        if u.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(u.shape)} for input {tuple(x.shape)}")
        x = x + (ts[i + 1] - ts[i]) * u
        if check_finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"average-velocity sampling produced NaN/Inf at step {i}")
        if traj is not None:
            traj.append(x)
    return SampleResult(x=x, nfe=nfe, times=g, trajectory=torch.stack(traj) if traj is not None else None,
                        info={"solver": "mean", "steps": len(ts) - 1})


def make_objective(model: nn.Module, split: bool = False, **kwargs: Any):
    """``SplitMeanFlow(model, **kwargs)`` if ``split`` else ``MeanFlow(model, **kwargs)``."""
    return SplitMeanFlow(model, **kwargs) if split else MeanFlow(model, **kwargs)


def init_from_velocity(model: nn.Module, velocity_model: nn.Module) -> nn.Module:
    """Copy a trained plain velocity model's weights into a ``mean_flow=True`` model of the same
    architecture (the interval embedding stays zero, so the result starts as that velocity)."""
    state = copy.deepcopy(velocity_model.state_dict())
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"architectures differ: {str(e).splitlines()[0]} ...") from e
    bad = [k for k in missing if not k.startswith("interval_embed.")]
    if bad or unexpected:
        raise ValueError(f"architectures differ: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
    return model
