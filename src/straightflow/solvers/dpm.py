"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models") for any affine path, with the data prediction ``x1_hat``.

On a path ``x_t = alpha(t) x1 + sigma(t) x0`` let ``lam = log(alpha / sigma)`` (half the path's
``log_snr``) and ``m(lam) = x1_hat = path.velocity_to_x1(v, x, t)``. The probability-flow ODE
solved exactly from ``s`` to ``t`` (``h = lam_t - lam_s``) is

    x_t = (sigma_t / sigma_s) x_s + alpha_t * int_0^h e^{u - h} m(lam_s + u) du
        = (sigma_t / sigma_s) x_s + alpha_t * sum_k H_{k+1}(h) m^{(k)}(lam_s),

with ``H_k(h) = h^k phi_k(-h)``: ``H_1 = 1 - e^{-h}``, ``H_2 = h - H_1``, ``H_3 = h^2/2 - H_2``.
Each method truncates the sum and estimates the ``lam``-derivatives of ``m`` from earlier
evaluations (multistep) or from intermediate ones (singlestep).

Endpoints. On the linear path ``alpha(0) = 0`` (``lam = -inf``) and ``sigma(1) = 0`` (``lam =
+inf``). The first-order term is evaluated with ratios only,
``(sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) m_s`` (because
``alpha_t (1 - e^{-h}) = alpha_t - alpha_s sigma_t / sigma_s``), which is finite whenever
``sigma_s > 0``; a step that starts at ``sigma_s = 0`` (inversion from t = 1) uses the equal DDIM
form ``alpha_t m_s + sigma_t x0_hat_s``. A step that starts or ends at an infinite ``lam`` has an
infinite ``h``, so it is always first order, and an evaluation at an infinite ``lam`` is never
used as history (the multistep methods warm up again after it). The log-SNR helpers (``lam``,
``x1_hat``, ``H_k``, the first-order step, the warm-up orders) are in :mod:`.logsnr`.

Inversion (decreasing ``ts``, ``h < 0``) uses the same formulas and is supported by every method
here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..paths import AffinePath
from .base import lincomb, register_solver
from .protocol import Eval, State
from .logsnr import (alpha_sigma_lambda, as_path, derivative_weights, first_order_step, hphi, order_now, push_history,
                     t_of_lambda, x1_coefficients, x1_from_velocity)


def _x1(path: AffinePath, v: Tensor, x: Tensor, t: float) -> Tensor:
    return path.velocity_to_x1(v, x, torch.as_tensor(t, dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------- multistep
def _multistep(x, ts, path, order, lower_order_final):
    path = as_path(path)
    n = len(ts) - 1
    ab = alpha_sigma_lambda(path, ts)
    cm = x1_coefficients(path, ts)
    hist: list = []  # (lam, x1_hat) at finite lam, newest last
    for i in range(n):
        v = yield Eval(x, ts[i], i)
        m = x1_from_velocity(cm[i], x, v)
        (a_s, s_s, lam_s), (a_t, s_t, lam_t) = ab[i], ab[i + 1]
        hist = push_history(hist, lam_s, m, order)
        k = order_now(order, len(hist), i, n, lower_order_final, lam_s, lam_t)
        if s_s <= 0.0:  # from the data (inversion): DDIM with both predictions
            x = first_order_step(path, x, m, v, ts[i], ab[i], ab[i + 1])
        else:
            # x_t = r x_s + (a_t - a_s r) m_s + a_t [H_2 m' + H_3 m''], m^(d) = sum_j w[d][j] m_j
            r = s_t / s_s
            pts = hist[-k:][::-1] if k >= 2 else [(lam_s, m)]  # newest first
            coef = [a_t - a_s * r] + [0.0] * (len(pts) - 1)
            if k >= 2:
                h = lam_t - lam_s
                for d, w in enumerate(derivative_weights([p[0] for p in pts])):
                    hk = a_t * hphi(d + 2, h)
                    coef = [c + hk * wj for c, wj in zip(coef, w)]
            x = lincomb([(r, x)] + [(c, p[1]) for c, p in zip(coef, pts)])
        yield State(i + 1, ts[i + 1], x)
    return x


@register_solver("dpm++1", order=1, evals_per_step=1, needs_path=True, aliases=("dpmpp_1", "dpmpp1", "dpm++1s"))
def dpmpp_1(x, ts, path=None):
    """DPM-Solver++ order 1 (DDIM in data prediction): ``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x1_hat_s``.

    Equal to ``alpha_t x1_hat_s + sigma_t x0_hat_s``; on the linear path this is exactly Euler,
    ``x_s + (t - s) v``.
    """
    return _multistep(x, ts, path, 1, False)


@register_solver("dpm++2m", order=2, evals_per_step=1, needs_path=True, aliases=("dpmpp_2m", "dpmpp2m", "dpm++(2m)"))
def dpmpp_2m(x, ts, path=None, lower_order_final: bool = True):
    """DPM-Solver++(2M): ``x_t = (sigma_t/sigma_s) x_s + alpha_t [H_1(h) m_s + H_2(h) (m_s - m_r) / (lam_s - lam_r)]``.

    ``m_r`` is the previous step's data prediction (one evaluation per step; the first step, and
    every step with an infinite lam, is first order). ``lower_order_final``: first-order last
    step when there are fewer than 15 steps.
    """
    return _multistep(x, ts, path, 2, lower_order_final)


@register_solver("dpm++3m", order=3, evals_per_step=1, needs_path=True, aliases=("dpmpp_3m", "dpmpp3m", "dpm++(3m)"))
def dpmpp_3m(x, ts, path=None, lower_order_final: bool = True):
    """DPM-Solver++(3M): ``x_t = (sigma_t/sigma_s) x_s + alpha_t [H_1 m_s + H_2 m'_s + H_3 m''_s]``.

    ``m'``, ``m''`` are the lam-derivatives of the quadratic through the last three data
    predictions (``H_k(h) = h^k phi_k(-h)``). Warm-up at orders 1, 2; with
    ``lower_order_final`` and fewer than 15 steps, the last two steps are of order 1 and 2.
    (The reference code weights ``m''`` by ``H_3 / 2``; the exact Taylor weight ``H_3`` is used here.)
    """
    return _multistep(x, ts, path, 3, lower_order_final)


# ---------------------------------------------------------------------- singlestep
def _singlestep(x, ts, path, order, r1):
    path = as_path(path)
    n = len(ts) - 1
    ab = alpha_sigma_lambda(path, ts)
    for i in range(n):
        s = ts[i]
        v = yield Eval(x, s, i)
        m = _x1(path, v, x, s)
        x_t = first_order_step(path, x, m, v, s, ab[i], ab[i + 1])
        lam_s, lam_t = ab[i][2], ab[i + 1][2]
        if math.isfinite(lam_s) and math.isfinite(lam_t):
            h = lam_t - lam_s
            if order == 2:
                t_u = t_of_lambda(path, lam_s + r1 * h)
                ab_u = alpha_sigma_lambda(path, [t_u])[0]
                x_u = first_order_step(path, x, m, v, s, ab[i], ab_u)
                m_u = _x1(path, (yield Eval(x_u, t_u, i)), x_u, t_u)
                x_t = x_t + ab[i + 1][0] * (hphi(2, h) / (r1 * h)) * (m_u - m)
            else:
                q1, q2 = r1, 2.0 / 3.0
                t_1, t_2 = t_of_lambda(path, lam_s + q1 * h), t_of_lambda(path, lam_s + q2 * h)
                ab_1, ab_2 = alpha_sigma_lambda(path, [t_1, t_2])
                x_1 = first_order_step(path, x, m, v, s, ab[i], ab_1)
                m_1 = _x1(path, (yield Eval(x_1, t_1, i)), x_1, t_1)
                x_2 = first_order_step(path, x, m, v, s, ab[i], ab_2) + ab_2[0] * (hphi(2, q2 * h) / (q1 * h)) * (m_1 - m)
                m_2 = _x1(path, (yield Eval(x_2, t_2, i)), x_2, t_2)
                x_t = x_t + ab[i + 1][0] * (hphi(2, h) / (q2 * h)) * (m_2 - m)
        x = x_t
        yield State(i + 1, ts[i + 1], x)
    return x


@register_solver("dpm++2s", order=2, evals_per_step=2, needs_path=True, aliases=("dpmpp_2s", "dpmpp2s", "dpm++(2s)"))
def dpmpp_2s(x, ts, path=None, r1: float = 0.5):
    """DPM-Solver++(2S): ``u = lam_s + r1 h``, ``x_u`` = first-order step, then
    ``x_t = (sigma_t/sigma_s) x_s + alpha_t [H_1(h) m_s + H_2(h) (m_u - m_s) / (r1 h)]``.

    Two evaluations per step, except a step from/to an infinite lam (t = 0 or 1 on the linear
    path), which is first order and costs one.
    """
    if not 0.0 < r1 <= 1.0:
        raise ValueError(f"r1 must be in (0, 1], got {r1}")
    return _singlestep(x, ts, path, 2, r1)


@register_solver("dpm++3s", order=3, evals_per_step=3, needs_path=True, aliases=("dpmpp_3s", "dpmpp3s", "dpm++(3s)"))
def dpmpp_3s(x, ts, path=None, r1: float = 1.0 / 3.0):
    """DPM-Solver++(3S) (DPM-Solver-3 in data prediction), ``r1 = 1/3``, ``r2 = 2/3``:
    ``x_u1`` first order; ``x_u2 = (sigma_u2/sigma_s) x_s + alpha_u2 [H_1(r2 h) m_s + H_2(r2 h) (m_u1 - m_s) / (r1 h)]``;
    ``x_t = (sigma_t/sigma_s) x_s + alpha_t [H_1(h) m_s + H_2(h) (m_u2 - m_s) / (r2 h)]``.

    Three evaluations per step; a step from/to an infinite lam is first order (one evaluation).
    ``r2 = 2/3`` is what makes the last line third order.
    """
    if not 0.0 < r1 < 2.0 / 3.0:
        raise ValueError(f"r1 must be in (0, 2/3), got {r1}")
    return _singlestep(x, ts, path, 3, r1)
