"""Exponential multistep in time with the data prediction: ``deis`` (predictor) and ``deis-pc``
(predictor + corrector reusing the next evaluation).

DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator") keeps
the exact linear part of the probability-flow ODE and fits a polynomial *in t* (its "tAB"
variant) to past network outputs. Here the fitted quantity is the data prediction
``m = x1_hat``. On ``x_t = alpha x1 + sigma x0`` the ODE in ``m`` is linear in ``x``, and
variation of constants with ``rho = alpha / sigma`` gives, for ``m`` replaced by its Lagrange
interpolant ``sum_j L_j(tau) m_j`` through the nodes ``tau_j``,

    x_t = sigma_t x0_hat_s + sum_j m_j [alpha_t L_j(t) - sigma_t int_s^t rho(tau) L_j'(tau) dtau]

(integration by parts of ``sigma_t int rho' m``; ``x0_hat_s = (x_s - alpha_s m_s) / sigma_s``).
One node is DDIM; the form is finite at both ends of the linear path: at ``t = 1`` it is the
interpolant's value ``sum_j L_j(1) m_j``, and at ``t = 0`` (``lam = -inf``) nothing diverges, so
the first evaluation *is* usable history. That is the difference from DPM-Solver++/UniPC, whose
polynomials live in ``lam`` and must discard the ``t = 0`` evaluation; at 3-5 NFE it halves the
error on the Gaussian-mixture oracle (see BENCHMARKS.md). The corrector (as UniC, Zhao et al.
2023) redoes the step with the evaluation at its end added as a node: one order more, no
extra NFE (the next step needs that evaluation anyway; no corrector after the last step).

The weights are scalars of the grid alone: the integral is a composite Gauss-Legendre sum,
split geometrically towards ``t = 1`` where ``rho`` has its pole. Global orders (measured on
the oracle over [0, 1]): ``deis`` ``min(order, 2)`` (its first step has one node), ``deis-pc``
``order + 1``. A step that starts at ``sigma = 0`` (inversion from the data)
is first order and uncorrected (the integral diverges there).
"""
from __future__ import annotations

import json
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..paths import AffinePath
from .base import lincomb, register_solver
from .protocol import Eval, State
from .logsnr import alpha_sigma, as_path, x1_coefficients, x1_from_velocity

_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)


def _quadrature(s: float, t: float) -> Tuple[np.ndarray, np.ndarray]:
    """Nodes and signed weights for ``int_s^t`` (either direction), split at ``1 - 2^-k (1 - lo)``."""
    lo, hi = min(s, t), max(s, t)
    cuts = [lo]
    while 1.0 - cuts[-1] > 1e-9:
        nxt = 1.0 - 0.5 * (1.0 - cuts[-1])
        if nxt >= hi:
            break
        cuts.append(nxt)
    cuts.append(hi)
    a, b = np.array(cuts[:-1]), np.array(cuts[1:])
    xs = (0.5 * (b - a))[:, None] * _GL_X + (0.5 * (a + b))[:, None]
    ws = (0.5 * (b - a))[:, None] * _GL_W
    return xs.ravel(), (1.0 if t >= s else -1.0) * ws.ravel()


def _lagrange(nodes: Sequence[float]) -> List[np.ndarray]:
    """Coefficients (highest power first) of the Lagrange basis polynomials through ``nodes``."""
    out = []
    for j, tj in enumerate(nodes):
        c = np.array([1.0])
        for k, tk in enumerate(nodes):
            if k != j:
                c = np.convolve(c, np.array([1.0, -tk])) / (tj - tk)
        out.append(c)
    return out


def _coefs(path: AffinePath, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    a, s = alpha_sigma(path, t)
    return a.numpy(), s.numpy()


_CACHE: Dict[tuple, Tuple[float, List[float]]] = {}


def step_weights(path: AffinePath, s: float, t: float, nodes: Sequence[float]) -> Tuple[float, List[float]]:
    """``(c, W)`` with ``x_t = c x_s + sum_j W_j m_j`` for the nodes ``nodes`` (``nodes[0] == s``).

    Scalars of the grid alone, so they are cached (per path configuration): repeated sampling on
    one grid pays for the quadrature once.
    """
    cfg = path.config()
    ident = path if cfg.get("name") == "custom" else json.dumps(cfg, sort_keys=True)  # custom: by identity
    key = (ident, float(s), float(t), tuple(float(v) for v in nodes))
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) > 20000:
            _CACHE.clear()
        hit = _CACHE[key] = _step_weights(path, s, t, nodes)
    return hit[0], list(hit[1])


def _step_weights(path: AffinePath, s: float, t: float, nodes: Sequence[float]) -> Tuple[float, List[float]]:
    (a_s, a_t), (s_s, s_t) = _coefs(path, np.array([s, t]))
    if s_s <= 0.0:
        raise ValueError("a step starting at sigma = 0 has no finite multistep form; use one node")
    basis = _lagrange(nodes)
    ints = np.zeros(len(nodes))
    if len(nodes) > 1 and s_t > 0.0:
        tau, w = _quadrature(s, t)
        a_q, s_q = _coefs(path, tau)
        rw = w * a_q / s_q
        ints = np.array([float(np.sum(rw * np.polyval(np.polyder(c), tau))) for c in basis])
    W = [float(a_t * np.polyval(c, t) - s_t * ints[j]) for j, c in enumerate(basis)]
    W[0] -= float(s_t * a_s / s_s)
    return float(s_t / s_s), W


def _deis(x, ts, path, order: int, corrector: bool, lower_order_final: bool):
    if order not in (1, 2, 3):
        raise ValueError(f"deis order must be 1, 2 or 3, got {order!r}")
    path = as_path(path)
    n = len(ts) - 1
    a_all, s_all = _coefs(path, np.asarray(ts, dtype=np.float64))
    tdt = dict(dtype=x.dtype, device=x.device)
    cm = x1_coefficients(path, ts)
    hist: list = []   # (tau, m), newest first
    prev = None       # (x_s, history used as the corrector's older nodes)
    for i in range(n):
        v = yield Eval(x, ts[i], i)
        m = x1_from_velocity(cm[i], x, v)
        if prev is not None:
            x_s, older = prev
            if corrector:
                nodes = [older[0][0], ts[i]] + [p[0] for p in older[1:]]
                vals = [older[0][1], m] + [p[1] for p in older[1:]]
                c, W = step_weights(path, ts[i - 1], ts[i], nodes[: order + 1])
                x = lincomb([(c, x_s)] + list(zip(W, vals[: order + 1])))
            yield State(i, ts[i], x)
        hist = [(ts[i], m)] + hist[: order]
        s_i = float(s_all[i])
        if s_i <= 0.0:  # from the data (inversion): DDIM with both predictions, first order
            x0 = path.velocity_to_x0(v, x, torch.as_tensor(ts[i], **tdt))
            x_new = lincomb([(float(a_all[i + 1]), m), (float(s_all[i + 1]), x0)])
            hist, prev = [], None
            x = x_new
            continue
        k = min(order, len(hist))
        if corrector and float(s_all[i + 1]) <= 0.0:
            # a step onto sigma = 0 is x = sum_j L_j(1) m_j, pure extrapolation with error h^k (no
            # integral smooths it) and no corrector follows: one more node keeps the order
            k = min(order + 1, len(hist))
        if lower_order_final and n < 15:
            k = min(k, n - i)
        pts = hist[:k]
        c, W = step_weights(path, ts[i], ts[i + 1], [p[0] for p in pts])
        prev = (x, hist[: order])
        x = lincomb([(c, x)] + [(w, p[1]) for w, p in zip(W, pts)])
    yield State(n, ts[n], x)
    return x


@register_solver("deis", order=2, evals_per_step=1, needs_path=True, aliases=("tab-deis", "deis-tab"))
def deis(x, ts, path=None, order: int = 3, lower_order_final: bool = True):
    """DEIS-style tAB in data prediction: ``x_t = sigma_t x0_hat_s + sum_j m_j [alpha_t L_j(t) - sigma_t int rho L_j']``.

    Lagrange polynomial in ``t`` through the last ``order`` data predictions (Zhang & Chen 2023).
    Registered as order 2: with ``order=3`` the local order is 3 but the first (one-node) step
    keeps the global order at 2 (measured); ``deis-pc`` has no such start-up loss.
    """
    return _deis(x, ts, path, order, False, lower_order_final)


@register_solver("deis-pc", order=3, evals_per_step=1, needs_path=True, aliases=("deis_pc", "tpc"))
def deis_pc(x, ts, path=None, order: int = 2, lower_order_final: bool = True):
    """``deis`` predictor + Adams-Moulton-type corrector on the next evaluation (order ``order + 1``, no extra NFE).

    The corrected state of step ``i`` is known after evaluation ``i + 1``; its ``State`` report comes then.
    """
    return _deis(x, ts, path, order, True, lower_order_final)
