"""Inverse problems ``y = A x + sigma_y eps`` with a rectified-flow prior (t = 0 noise, t = 1 data).

Methods (each returns a :class:`RestoreResult`: images, NFE, wall time, peak memory):

- :func:`flowchef` — FlowChef (Patel et al. 2024, "Steering Rectified Flow Models in the Vector
  Field for Controlled Image Generation"). Euler sampling; at each step the predicted clean image
  ``x1_hat = x_t + (1 - t) v`` is treated as a leaf (gradient skipping: no backprop through the
  network, which runs under ``torch.no_grad``), ``g = grad_{x1_hat} 1/2 ||A x1_hat - y||^2``, and
  the state is steered ``x_t <- x_t - s g`` (``inner`` times, ``x1_hat`` recomputed with the same
  ``v``) before the Euler step ``x_t + h v`` with the pre-steering velocity; no steering at the last
  step, constant step size, no final projection. This follows the authors' pixel-space code
  (github.com/FlowChef/FlowChef, ``inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py``:
  ``z <- z - scale * grad_z mean||A(z - t v) - y||^2`` for ``i < N - 1``, then ``z + dt v``); the
  ``inner`` loop is the ``optimization_steps`` loop of their latent pipeline
  (``src/pipeline_rf_inverseproblems.py``, which uses Adam and may also steer the last step: on
  digits neither Adam nor steering the last step raised validation PSNR). FlowChef's PSNR peaks at
  few steps (5-10 on digits) and falls slowly with more; ``straightflow bench control`` sweeps the
  step count for FlowChef and DPS-style together (its budget section).
- :func:`dps` — DPS-style baseline (Chung et al. 2023, "Diffusion Posterior Sampling"):
  ``g = grad_{x_t} ||A x1_hat(x_t) - y||^2`` *through the network*, step ``zeta / ||A x1_hat - y||``.
- :func:`flair` — a small FLAIR (Erbach et al. 2025, "Solving Inverse Problems with FLAIR"):
  variational optimisation of the estimate ``mu`` (initialised at ``A^+ y``) with, per time
  ``t`` (noise -> data), the flow-matching regulariser gradient ``w_t (mu - x1_hat)`` at
  ``x_t = t mu + (1 - t) n`` (score-distillation style: no network backprop), deterministic
  trajectory adjustment (the next ``n`` is the model's noise prediction ``x_t - t v``), a
  time-dependent calibration ``w_t`` (inverse denoising error measured offline,
  :func:`flair_calibration`), and decoupled hard data consistency: ``mu <- mu - A^+(A mu - y)``
  for ``t < t_project`` plus gradient steps on ``||A mu - y||^2`` that stop at the noise level.
- :class:`PMRF` — Posterior-Mean Rectified Flow (Ohayon et al. 2025): a small UNet posterior-mean
  predictor ``f(A^+ y) ~ E[x | y]`` trained with MSE, then a rectified flow from
  ``f(y) + sigma_s eps`` to the clean image; sampling starts at the predictor's output.

The methods are registered by name in :data:`INVERSE_METHODS` (:func:`restore` dispatches through
it). NFE counts velocity-network evaluations through
:class:`~straightflow.solvers.base.CountedVelocity` (a guided model is charged the rows it computes;
a DPS step is one forward + one backward: NFE 1, the backward is reported in
``info['backward_passes']``; PMRF adds its predictor call to ``nfe``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the level before the call; on CPU
the peak of live tensor bytes allocated during the call, from ``torch.profiler`` allocation
events (``tracemalloc`` does not see torch's CPU allocator). Memory is measured in a second,
identical (same seed) run so that profiling does not distort the wall time of the first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..grids import make_grid
from ..registry import Registry, UnknownNameError
from ..solvers.base import CountedVelocity
from ..solvers.noise import initial_noise
from ..solvers.rk import EULER, rk_step
from .operators import Operator

__all__ = ["RestoreResult", "flowchef", "dps", "flair", "flair_calibration", "PMRF", "restore", "METHODS",
           "INVERSE_METHODS", "available", "peak_memory", "operator_norm2"]


@dataclass
class RestoreResult:
    """Restored images ``x``, velocity-network evaluations ``nfe``, wall ``seconds``, ``peak_bytes``."""

    x: Tensor
    nfe: int
    seconds: float
    peak_bytes: Optional[int]
    info: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- measuring
def peak_memory(fn: Callable[[], Any], device: Optional[torch.device] = None) -> Tuple[Any, int]:
    """Run ``fn()``; return ``(output, peak bytes allocated during the call)`` (see module doc)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    from ..system import native_output_silenced

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with native_output_silenced():  # the profiler's start/stop lines from C++ would land in the user's output
        prof.__enter__()
    try:
        out = fn()
    finally:
        with native_output_silenced():
            prof.__exit__(None, None, None)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return out, int(peak)


_NORMS: Dict[int, float] = {}


def operator_norm2(op: Operator) -> float:
    """``||A||_2^2`` (largest eigenvalue of ``A^T A``) from the dense matrix, cached per operator."""
    key = id(op)
    if key not in _NORMS:
        _NORMS[key] = float(torch.linalg.matrix_norm(op.matrix(torch.float64), ord=2) ** 2)
    return _NORMS[key]


# ----------------------------------------------------------------------------- FlowChef
def _flowchef(model, op: Operator, y: Tensor, steps: int = 50, step_size: float = 1.0, inner: int = 1,
              cond: Optional[Dict[str, Any]] = None, seed: int = 0, x0: Optional[Tensor] = None):
    """FlowChef (Patel et al. 2024): ``x <- x - s grad_{x1_hat} 1/2 ||A x1_hat - y||^2`` (``inner`` times,
    no network gradient), then the Euler step ``x + h v`` with the pre-steering ``v``."""
    x = initial_noise((y.shape[0], *op.shape), seed, dtype=y.dtype, device=y.device)[0] if x0 is None else x0.clone()
    ts = make_grid("uniform", steps).tolist()
    s = float(step_size) / operator_norm2(op)
    f = CountedVelocity(model, cond, check_finite=False)
    for i in range(steps):
        t, h = ts[i], ts[i + 1] - ts[i]
        with torch.no_grad():
            v = f(x, t, i)
        if i < steps - 1:
            for _ in range(inner):
                x1_hat = (x + (1.0 - t) * v).detach().requires_grad_(True)  # a leaf: no network graph
                with torch.enable_grad():
                    loss = 0.5 * (op(x1_hat) - y).pow(2).sum()
                    (g,) = torch.autograd.grad(loss, x1_hat)
                x = x - s * g
        x = rk_step(f, x, t, h, EULER, k1=v).detach()
    return x, f.nfe, {"step_size": float(step_size), "inner": inner, "backward_passes": 0}


# ----------------------------------------------------------------------------- DPS
def _dps(model, op: Operator, y: Tensor, steps: int = 50, step_size: float = 1.0,
         cond: Optional[Dict[str, Any]] = None, seed: int = 0, x0: Optional[Tensor] = None):
    """DPS-style (Chung et al. 2023): the Euler step ``x + h v`` minus ``zeta / ||A x1_hat - y||``
    times ``grad_x ||A x1_hat(x) - y||^2``, backpropagated through the network."""
    x = initial_noise((y.shape[0], *op.shape), seed, dtype=y.dtype, device=y.device)[0] if x0 is None else x0.clone()
    ts = make_grid("uniform", steps).tolist()
    f = CountedVelocity(model, cond, check_finite=False)
    for i in range(steps):
        t, h = ts[i], ts[i + 1] - ts[i]
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = f(xr, t, i)
            x1_hat = xr + (1.0 - t) * v
            res = (op(x1_hat) - y).pow(2).flatten(1).sum(1)  # (B,) ||A x1_hat - y||^2
            (g,) = torch.autograd.grad(res.sum(), xr)
        x = rk_step(f, x, t, h, EULER, k1=v.detach())
        if i < steps - 1:
            zeta = float(step_size) / res.detach().sqrt().clamp_min(1e-8)  # DPS: zeta_i = zeta / ||y - A x1_hat||
            x = x - zeta.reshape(-1, *([1] * (x.ndim - 1))) * g
        x = x.detach()
    return x, f.nfe, {"step_size": float(step_size), "backward_passes": steps}


# ----------------------------------------------------------------------------- FLAIR
@torch.no_grad()
def flair_calibration(model, x_clean: Tensor, steps: int = 50, t_range: Tuple[float, float] = (0.02, 0.98),
                      cond: Optional[Dict[str, Any]] = None, seed: int = 0) -> Tensor:
    """Regulariser weights ``w_t ∝ 1 / E||x1_hat(x_t) - x1||^2`` at FLAIR's times, normalised to mean 1
    (the model's offline denoising accuracy on clean images ``x_clean``; costs ``steps`` NFE once)."""
    ts = torch.linspace(t_range[0], t_range[1], steps).tolist()
    n = initial_noise(x_clean.shape, seed, dtype=x_clean.dtype, device=x_clean.device)[0]
    f = CountedVelocity(model, cond, check_finite=False)
    errs = []
    for t in ts:
        xt = t * x_clean + (1 - t) * n
        v = f(xt, t)
        errs.append(float((xt + (1 - t) * v - x_clean).pow(2).mean()))
    w = 1.0 / (torch.tensor(errs, dtype=torch.float64) + 1e-6)
    return (w / w.mean()).float()


def _flair(model, op: Operator, y: Tensor, steps: int = 50, reg_weight: float = 0.5, data_steps: int = 5,
           t_range: Tuple[float, float] = (0.02, 0.98), t_project: float = 0.3, sigma_y: float = 0.0,
           calibration: Optional[Tensor] = None, cond: Optional[Dict[str, Any]] = None, seed: int = 0):
    """A small FLAIR (Erbach et al. 2025): variational updates of ``mu`` with the flow-matching
    regulariser ``w_t (mu - x1_hat)``, trajectory adjustment and hard data consistency."""
    mu = (op.pinv(y) if op.exact_pinv else op.adjoint(y)).detach()
    n = initial_noise((y.shape[0], *op.shape), seed, dtype=y.dtype, device=y.device)[0]
    ts = torch.linspace(t_range[0], t_range[1], steps).tolist()
    if calibration is not None and len(calibration) != steps:
        raise ValueError(f"flair: calibration has {len(calibration)} weights for {steps} steps")
    lr_data = 1.0 / operator_norm2(op)
    m = y[0].numel()
    stop = (float(sigma_y) ** 2) * m  # early stopping: residual at the noise level (per image)
    f = CountedVelocity(model, cond, check_finite=False)
    data_iters = 0
    for i, t in enumerate(ts):
        xt = t * mu + (1 - t) * n
        with torch.no_grad():
            v = f(xt, t, i)
        x1_hat = xt + (1 - t) * v
        w = float(reg_weight) * (float(calibration[i]) if calibration is not None else 1.0)
        mu = mu - min(w, 1.0) * (mu - x1_hat)          # regulariser step (SDS gradient, no backprop)
        n = xt - t * v                                  # deterministic trajectory adjustment
        if t < t_project and op.exact_pinv:
            mu = op.project(mu, y)                      # hard data consistency (closed-form A^+ only)
        for _ in range(data_steps):                     # data term, early-stopped at the noise level
            r = op(mu) - y
            active = (r.pow(2).flatten(1).sum(1) > stop).to(mu.dtype).reshape(-1, *([1] * (mu.ndim - 1)))
            if not bool(active.any()):
                break
            mu = mu - lr_data * active * op.adjoint(r)
            data_iters += 1
    return mu.detach(), f.nfe, {"reg_weight": reg_weight, "data_steps": data_steps, "data_iterations": data_iters,
                                "t_project": t_project, "calibrated": calibration is not None, "backward_passes": 0}


# ----------------------------------------------------------------------------- PMRF
class _PosteriorMeanObjective:
    """Stage 1 of PMRF: ``E || f(A^+ (A x + sigma_y eps)) - x ||^2`` (duck-types ``Flow`` for the trainer)."""

    def __init__(self, net: nn.Module, op: Operator, sigma_y: float) -> None:
        self.model, self.op, self.sigma_y = net, op, float(sigma_y)
        self.coupling = type("NoCoupling", (), {"needs_pairs": False, "name": "none"})()

    def config(self) -> Dict[str, Any]:
        return {"name": "pmrf_posterior_mean", "operator": self.op.config(), "sigma_y": self.sigma_y}

    def loss(self, x1, cond=None, x0=None, generator=None, model=None):
        model = self.model if model is None else model
        y = self.op.measure(x1, self.sigma_y, generator=generator)
        return (PMRF.predict_with(model, self.op, y) - x1).pow(2).mean()


class _PMRFFlowObjective:
    """Stage 2 of PMRF: rectified flow from ``f(y) + sigma_s eps`` (x0) to the clean image (x1)."""

    def __init__(self, net: nn.Module, predictor: nn.Module, op: Operator, sigma_y: float, sigma_s: float) -> None:
        from ..flow import Flow

        self.flow = Flow(net)
        self.model, self.coupling = net, self.flow.coupling
        self.predictor, self.op, self.sigma_y, self.sigma_s = predictor, op, float(sigma_y), float(sigma_s)

    def config(self) -> Dict[str, Any]:
        return {"name": "pmrf_flow", "operator": self.op.config(), "sigma_y": self.sigma_y, "sigma_s": self.sigma_s,
                "flow": self.flow.config()}

    def loss(self, x1, cond=None, x0=None, generator=None, model=None):
        dev = generator.device if generator is not None else x1.device
        with torch.no_grad():
            y = self.op.measure(x1, self.sigma_y, generator=generator)
            start = PMRF.predict_with(self.predictor, self.op, y)
            start = start + self.sigma_s * torch.randn(start.shape, generator=generator, dtype=start.dtype, device=dev)
        return self.flow.loss(x1, x0=start, generator=generator, model=model)


class PMRF:
    """Posterior-Mean Rectified Flow for one operator and noise level.

    ``fit(x_train)`` trains the predictor (``pm_steps``) and then the flow (``flow_steps``) with the
    library trainer (EMA, AdamW); ``restore(y, steps)`` runs ``x = f(y) + sigma_s eps`` through the
    flow with Euler. Networks: unconditional UNets with ``base_channels``; the predictor is
    ``f(z) = z + UNet(z, t=0)`` with ``z = A^+ y`` (the UNet's zero-initialised output makes it
    start as the pseudo-inverse).
    """

    def __init__(self, op: Operator, sigma_y: float = 0.0, sigma_s: float = 0.05, base_channels: int = 16) -> None:
        from ..models import UNet

        c, h, _ = op.shape
        mults = [1, 2] if h % 2 == 0 else [1]
        self.op, self.sigma_y, self.sigma_s = op, float(sigma_y), float(sigma_s)
        self.predictor: nn.Module = UNet(in_channels=c, resolution=h, base_channels=base_channels, channel_mults=mults)
        self.flow_model: nn.Module = UNet(in_channels=c, resolution=h, base_channels=base_channels, channel_mults=mults)
        self.fitted = False
        self.train_seconds = 0.0

    @staticmethod
    def predict_with(net: nn.Module, op: Operator, y: Tensor) -> Tensor:
        z = op.pinv(y)
        return z + net(z, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device))

    def fit(self, x_train: Tensor, pm_steps: int = 400, flow_steps: int = 800, batch_size: int = 128,
            lr: float = 2e-3, seed: int = 0, progress: bool = False, out: Optional[str] = None,
            device: str = "cpu") -> "PMRF":
        """Train both stages on clean images ``x_train`` (measurements are simulated on the fly) on ``device``."""
        from ..train import train

        t0 = time.perf_counter()
        kw = dict(batch_size=batch_size, lr=lr, warmup=50, ema_decay=0.995, seed=seed, progress=progress,
                  ckpt_every=10**9, lr_schedule="cosine", device=str(device))
        pm = train(_PosteriorMeanObjective(self.predictor, self.op, self.sigma_y), x_train, pm_steps,
                   out=None if out is None else f"{out}/predictor", desc="pmrf predictor", **kw)
        self.predictor = pm.model.eval()
        for p in self.predictor.parameters():
            p.requires_grad_(False)
        fl = train(_PMRFFlowObjective(self.flow_model, self.predictor, self.op, self.sigma_y, self.sigma_s), x_train,
                   flow_steps, out=None if out is None else f"{out}/flow", desc="pmrf flow", **kw)
        self.flow_model = fl.model.eval()
        for p in self.flow_model.parameters():
            p.requires_grad_(False)
        self.fitted = True
        self.train_seconds = time.perf_counter() - t0
        self.final_losses = (pm.final_loss, fl.final_loss)
        return self

    @torch.no_grad()
    def posterior_mean(self, y: Tensor) -> Tensor:
        return self.predict_with(self.predictor, self.op, y)

    @torch.no_grad()
    def _restore(self, y: Tensor, steps: int = 10, seed: int = 0):
        if not self.fitted:
            raise ValueError("PMRF: call fit(x_train) (or load trained networks) before restoring")
        from ..solvers import sample

        start = self.posterior_mean(y)
        x0 = start + self.sigma_s * initial_noise(start.shape, seed, dtype=start.dtype, device=start.device)[0]
        res = sample(self.flow_model, x0, solver="euler", steps=steps)
        return res.x, res.nfe + 1, {"flow_nfe": res.nfe, "predictor_calls": 1, "sigma_s": self.sigma_s,
                                    "backward_passes": 0, "posterior_mean": start}


# ----------------------------------------------------------------------------- one entry point
def _pmrf(model, op: Operator, y: Tensor, **kw):
    """PMRF (Ohayon et al. 2025): ``model`` is a fitted :class:`PMRF`; see :meth:`PMRF.fit`."""
    if not isinstance(model, PMRF):
        raise ValueError("method 'pmrf' needs a fitted PMRF object as model (see PMRF.fit)")
    return model._restore(y, **kw)


_METHODS = (("flowchef", _flowchef), ("dps", _dps), ("flair", _flair), ("pmrf", _pmrf))
INVERSE_METHODS: Registry = Registry("restoration method")
"""``run(model, op, y, **kw) -> (x, nfe, info)`` of every restoration method, by name."""
for _name, _run in _METHODS:
    INVERSE_METHODS.register(_name)(_run)

METHODS: Tuple[str, ...] = tuple(name for name, _ in _METHODS)
"""The restoration method names, in the order the CLI and the benchmarks list them."""


def available() -> List[str]:
    """Names :func:`restore` accepts."""
    return list(METHODS)


def restore(method: str, model, op: Operator, y: Tensor, memory: bool = True, **kw) -> RestoreResult:
    """Run ``method`` (one of :data:`METHODS`) and time it; with ``memory`` measure its peak memory in
    a second identical run. ``model`` is the velocity model (a fitted :class:`PMRF` for ``pmrf``)."""
    if method not in INVERSE_METHODS:
        raise UnknownNameError(f"unknown restoration method {method!r}; valid: {', '.join(METHODS)}")
    name = INVERSE_METHODS.canonical(method)
    run = INVERSE_METHODS.get(name)
    fn = lambda: run(model, op, y, **kw)  # noqa: E731
    t0 = time.perf_counter()
    x, nfe, info = fn()
    seconds = time.perf_counter() - t0
    peak = None
    if memory:
        _, peak = peak_memory(fn, y.device)
    return RestoreResult(x, nfe, seconds, peak, {"method": name, "operator": op.name, **info})


def flowchef(model, op: Operator, y: Tensor, steps: int = 50, step_size: float = 1.0, inner: int = 1,
             cond=None, seed: int = 0, memory: bool = True) -> RestoreResult:
    """FlowChef with gradient skipping (see module doc); ``step_size`` is in units of ``1 / ||A||^2``
    (the authors' ``gradient_scale`` on a mean-squared loss is ``step_size * numel / (2 ||A||^2)``)."""
    return restore("flowchef", model, op, y, memory=memory, steps=steps, step_size=step_size, inner=inner,
                   cond=cond, seed=seed)


def dps(model, op: Operator, y: Tensor, steps: int = 50, step_size: float = 1.0, cond=None, seed: int = 0,
        memory: bool = True) -> RestoreResult:
    """DPS-style baseline backpropagating through the network (see module doc)."""
    return restore("dps", model, op, y, memory=memory, steps=steps, step_size=step_size, cond=cond, seed=seed)


def flair(model, op: Operator, y: Tensor, steps: int = 50, reg_weight: float = 0.5, data_steps: int = 5,
          t_project: float = 0.3, sigma_y: float = 0.0, calibration: Optional[Tensor] = None, cond=None,
          seed: int = 0, memory: bool = True) -> RestoreResult:
    """FLAIR-like variational restoration with hard data consistency (see module doc)."""
    return restore("flair", model, op, y, memory=memory, steps=steps, reg_weight=reg_weight, data_steps=data_steps,
                   t_project=t_project, sigma_y=sigma_y, calibration=calibration, cond=cond, seed=seed)
