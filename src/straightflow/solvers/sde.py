"""Stochastic sampling along any affine path: Euler-Maruyama on the marginal-preserving SDE.

For the path's marginals ``p_t`` with velocity ``v`` and score ``s = grad log p_t``, every SDE

    dX = [v(X, t) + g(t)^2 / 2 * s(X, t)] dt + g(t) dW,    t: 0 -> 1,

has the same marginals as the ODE ``dX = v dt`` (the Fokker-Planck terms ``-div(p g^2/2 grad log p)``
and ``g^2/2 Laplacian p`` cancel), whatever the diffusion ``g >= 0`` (Albergo et al. 2023,
"Stochastic Interpolants"; Ma et al. 2024, "SiT"). The score comes from the velocity model
through the path (:meth:`~straightflow.paths.AffinePath.velocity_to_score`), so any velocity
model trained on an affine path can be sampled this way at 1 NFE per step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from .base import register_solver
from .protocol import Eval, State

__all__ = ["euler_maruyama", "diffusion_schedule", "DIFFUSIONS"]


def _sigma(path, t, c):
    return c * float(path.sigma(torch.as_tensor(t, dtype=torch.float64)))


# Named diffusion schedules g(t; c, path). All but "constant" vanish at t = 1, where the score of
# a data distribution with small (or zero) spread blows up like 1 / sigma(t).
DIFFUSIONS = {
    "constant": lambda t, c, path: c,
    "sigma": lambda t, c, path: _sigma(path, t, c),  # g = c sigma(t)
    "decreasing": lambda t, c, path: c * 0.5 * (1 + math.cos(math.pi * t)),  # c at t=0, 0 at t=1
    "sin": lambda t, c, path: c * math.sin(math.pi * t),  # 0 at both ends, c at t = 1/2
}


def diffusion_schedule(g: Union[float, str, Callable[[float], float]], path, scale: float = 1.0) -> Callable[[float], float]:
    """``g`` as a function of ``t``: a float (constant), a callable ``g(t)`` or a name of :data:`DIFFUSIONS`.

    Named schedules are multiplied by ``scale`` (``c``): ``"constant"`` ``c``, ``"sigma"``
    ``c sigma(t)``, ``"decreasing"`` ``c (1 + cos pi t) / 2``, ``"sin"`` ``c sin(pi t)``.
    """
    if isinstance(g, str):
        key = g.lower()
        if key not in DIFFUSIONS:
            raise ValueError(f"unknown diffusion schedule {g!r}; valid: {', '.join(DIFFUSIONS)} "
                             "(or a float, or a callable g(t))")
        fn = DIFFUSIONS[key]
        return lambda t: float(fn(t, float(scale), path))
    if callable(g):
        return lambda t: float(g(t))
    c = float(g)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"diffusion g must be finite and >= 0, got {g}")
    return lambda t: c


@register_solver("sde", order=1, evals_per_step=1, aliases=("euler_maruyama",), stochastic=True,
                 needs_path=True)
def euler_maruyama(x, ts, generator: Optional[torch.Generator] = None, path=None,
                   g: Union[float, str, Callable[[float], float]] = "sigma", scale: float = 1.0,
                   last_step: str = "ode"):
    """Euler-Maruyama for ``dX = [v + g^2/2 s] dt + g dW`` (marginal-preserving for any ``g``).

    ``x_{i+1} = x_i + h (v_i + g(t_i)^2 / 2 * s_i) + g(t_i) sqrt(h) z_i``, ``z_i ~ N(0, I)`` drawn
    with ``generator`` (same generator seed, same samples), ``s_i = path.velocity_to_score(v_i, x_i, t_i)``.
    ``g``: a float, a callable ``g(t)`` or a named schedule (:func:`diffusion_schedule`, times
    ``scale``); default ``"sigma"``, ``g = sigma(t)``, which vanishes at t = 1 with the noise level.
    ``g = 0`` is the Euler ODE sampler. Weak order 1 (the marginals' error falls like ``h``).

    The last step (the one ending at the final grid time) has no noise: ``last_step="ode"``
    (default) is an Euler step on the velocity alone (no score term, so no 1/sigma blow-up for
    any ``g``); ``"denoise"`` jumps to Tweedie's posterior mean ``x1_hat = E[x1 | x_t]`` (on the
    linear path the two coincide); ``"sde"`` keeps the full stochastic update. Sampling only:
    a decreasing grid (inversion) is refused.
    """
    if path is None:
        raise ValueError("sde solver needs the affine path the model was trained on (path=...)")
    if len(ts) > 1 and ts[-1] < ts[0]:
        raise ValueError("the SDE sampler cannot invert (data -> noise): its noise is not reversible; "
                         "use a deterministic solver (euler, heun, rk4, dopri5, ...) for inversion")
    if last_step not in ("ode", "denoise", "sde"):
        raise ValueError(f"last_step must be 'ode', 'denoise' or 'sde', got {last_step!r}")
    gfn = diffusion_schedule(g, path, scale)
    n = len(ts) - 1
    for i in range(n):
        t, h = ts[i], ts[i + 1] - ts[i]
        v = yield Eval(x, t, i)
        if i == n - 1 and last_step == "ode":
            x = x + h * v
        elif i == n - 1 and last_step == "denoise":
            x = path.velocity_to_x1(v, x, torch.as_tensor(t, dtype=x.dtype, device=x.device))
        else:
            gt = gfn(t)
            if gt < 0 or not math.isfinite(gt):
                raise ValueError(f"diffusion g(t) must be finite and >= 0, got g({t:.4g}) = {gt}")
            if gt == 0:
                x = x + h * v
            else:
                tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
                score = path.velocity_to_score(v, x, tt)
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + h * (v + 0.5 * gt * gt * score) + gt * math.sqrt(h) * z
        yield State(i + 1, ts[i + 1], x)
    return x
