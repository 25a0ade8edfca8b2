"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models") with the data prediction ``x1_hat``, for any affine path.

Notation as in :mod:`.dpm` and :mod:`.logsnr`: ``lam = log(alpha / sigma)``, ``m = x1_hat``, ``h = lam_t - lam_s``,
``H_k(h) = h^k phi_k(-h)``. With earlier points ``r_j = (lam_j - lam_s) / h`` and
``D_j = (m_j - m_s) / r_j``:

* UniP-p (predictor, ``p - 1`` earlier points):
  ``x~_t = (sigma_t/sigma_s) x_s + alpha_t [H_1(h) m_s + B(h) sum_j rho_j D_j]``,
* UniC-p (corrector, the same points plus the evaluation ``m_t`` at ``x~_t``, ``r = 1``):
  ``x_t = (sigma_t/sigma_s) x_s + alpha_t [H_1(h) m_s + B(h) (sum_j rho^c_j D_j + rho^c_p (m_t - m_s))]``,

where ``rho`` solves ``sum_j rho_j r_j^{n-1} = n! H_{n+1}(h) / (h^n B(h))`` for ``n = 1..``(number
of points), except the one-point systems, which take ``rho = 1/2`` (the ``h -> 0`` limit) as
the paper does; that is where ``B`` matters. ``B(h)`` is ``h`` (``bh1``) or ``1 - e^{-h}``
(``bh2``: the paper's ``e^{h'} - 1`` at the data-prediction step ``h' = -h``).

``m_t`` is the evaluation the next predictor step needs anyway, so the corrector costs no
extra NFE (one evaluation per step; no corrector after the last step). Orders: predictor ``p``,
predictor + corrector ``p + 1``. Inversion (decreasing ``ts``) is supported.

Endpoints, as in the reference implementations (the original UniPC code and diffusers'
``UniPCMultistepScheduler`` with flow sigmas), which this module matches to float32 rounding
on the same grid:

* An evaluation at ``alpha = 0`` (t = 0 on the linear path, ``lam = -inf``) is placed at the
  log-SNR of ``t = T_NOISE = 1e-6`` for the history and the corrector (diffusers' flow sigmas
  start at ``sigma = 1 - 1e-6`` for that reason); the first step's predictor keeps the exact
  ``alpha_s = 0`` form (DDIM). So the first step *is* corrected: with ``bh2``, ``B(h) -> 1``,
  ``x_1 ~ sigma_1 x_0 + alpha_1 (m_0 + m_1) / 2``. Discarding that evaluation instead (as an
  earlier version did) left UniPC 1.1-2x behind diffusers' at NFE 3-5 on the oracle. With
  ``bh1`` (``B(h) = h``, about 14 on that step) the correction would blow up, so there the
  evaluation at ``lam = -inf`` is neither history nor corrected (diffusers' bh1 gives NaN on
  flow sigmas, so there is no reference to follow).
* ``lower_order_final``: the last ``order - 1`` steps use orders ``..., 2, 1`` whatever the
  number of steps (DPM-Solver++ lowers only below 15 steps; UniPC's reference code always does).
  A predictor-only final step of order >= 2 extrapolates the data prediction in ``lam`` over
  the (long, in ``lam``) last step and was up to 10x less accurate (order 3 at >= 15 steps; order
  2 on grids that stop short of t = 1).
* A step that ends at ``sigma = 0`` (``lam = +inf``) is first order; a step that starts there
  (inversion from the data) is DDIM with both predictions.

The corrected state of step ``i`` is known only after the evaluation at step ``i + 1``, so
its ``State(i + 1, t, x)`` report comes then (with the corrected state), one evaluation late.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import lincomb, register_solver
from .protocol import Eval, State
from .logsnr import (alpha_sigma_lambda, as_path, first_order_step, hphi, order_now, push_history, x1_coefficients,
                     x1_from_velocity)

_VARIANTS = ("bh1", "bh2")
T_NOISE = 1e-6  # where an evaluation at alpha = 0 sits in log-SNR (history, corrector)


def _b(h: float, variant: str) -> float:
    return h if variant == "bh1" else -math.expm1(-h)


def _rhos(rs, h: float, bh: float):
    """Solve ``sum_j rho_j r_j^{n-1} = n! H_{n+1}(h) / (h^n B)``, ``n = 1..len(rs)``; 1/2 for one point."""
    p = len(rs)
    if p == 1:
        return [0.5]
    R = np.array([[r ** (nn - 1) for r in rs] for nn in range(1, p + 1)], dtype=np.float64)
    b = np.array([math.factorial(nn) * hphi(nn + 1, h) / (h**nn * bh) for nn in range(1, p + 1)])
    return np.linalg.solve(R, b).tolist()


def _update(x_s, m_s, ab_s, ab_t, pts, extra, rho, bh):
    """``(sigma_t/sigma_s) x_s + alpha_t [H_1 m_s + B sum_j rho_j D_j]`` as one linear combination,
    ``D_j = (m_j - m_s) / r_j`` for the history ``pts`` and ``D = m_t - m_s`` for ``extra`` (corrector)."""
    (a_s, s_s, lam_s), (a_t, _, lam_t) = ab_s, ab_t
    r = ab_t[1] / s_s
    h = lam_t - lam_s
    c_ms = a_t - a_s * r
    terms = [(r, x_s)]
    for (l, mj), rh in zip(pts, rho):
        rj = (l - lam_s) / h
        w = a_t * bh * rh / rj
        terms.append((w, mj))
        c_ms -= w
    if extra is not None:
        w = a_t * bh * rho[-1]
        terms.append((w, extra))
        c_ms -= w
    return lincomb(terms + [(c_ms, m_s)])


def _unipc(x, ts, path, order, variant, lower_order_final, corrector):
    if variant not in _VARIANTS:
        raise ValueError(f"UniPC variant must be one of {_VARIANTS}, got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    path = as_path(path)
    n = len(ts) - 1
    ab = alpha_sigma_lambda(path, ts)
    # an evaluation at alpha = 0 (t = 0 on the linear path, lam = -inf) enters the history and the
    # corrector at the log-SNR of t = T_NOISE, as the reference code's flow sigmas (starting at
    # sigma = 1 - 1e-6) do; its first-order part keeps the exact alpha_s = 0 form
    lam_noise = 0.5 * float(path.log_snr(torch.tensor(T_NOISE, dtype=torch.float64)))
    if variant == "bh2":  # bh1's B(h) = h would weight that correction by ~14: it stays uncorrected
        ab = [(a, s, lam_noise if lam == -math.inf and s > 0.0 else lam) for a, s, lam in ab]
    cm = x1_coefficients(path, ts)
    hist: list = []  # (lam, x1_hat) at finite lam, newest last
    prev = None      # (x at the start of the last step, order used, its history points)
    for i in range(n):
        v = yield Eval(x, ts[i], i)
        m = x1_from_velocity(cm[i], x, v)
        if prev is not None:
            x_s, k, pts = prev
            lam_s, lam_t = ab[i - 1][2], ab[i][2]
            if corrector and math.isfinite(lam_s) and math.isfinite(lam_t):
                h = lam_t - lam_s
                bh = _b(h, variant)
                rho = _rhos([(l - lam_s) / h for l, _ in pts[:-1]] + [1.0], h, bh)
                x = _update(x_s, pts[-1][1], ab[i - 1], ab[i], pts[:-1], m, rho, bh)
            yield State(i, ts[i], x)
        lam_s, lam_t = ab[i][2], ab[i + 1][2]
        hist = push_history(hist, lam_s, m, order)
        k = order_now(order, len(hist), i, n, False, lam_s, lam_t)
        if lower_order_final:  # the last steps at lower order whatever n, as the reference code does
            k = min(k, n - i)
        pts = hist[-k:] if hist else []
        if ab[i][1] <= 0.0:  # from the data (inversion): DDIM with both predictions
            x_new = first_order_step(path, x, m, v, ts[i], ab[i], ab[i + 1])
        else:
            h = lam_t - lam_s
            bh = _b(h, variant) if k >= 2 else 0.0
            rho = _rhos([(l - lam_s) / h for l, _ in pts[:-1]], h, bh) if k >= 2 else []
            x_new = _update(x, m, ab[i], ab[i + 1], pts[:-1] if k >= 2 else [], None, rho, bh)
        prev = (x, k, pts)
        x = x_new
    yield State(n, ts[n], x)
    return x


@register_solver("unipc", order=3, evals_per_step=1, needs_path=True)
def unipc(x, ts, path=None, order: int = 2, variant: str = "bh2",
          lower_order_final: bool = True, corrector: bool = True):
    """UniPC: UniP-``order`` predictor + UniC corrector on the evaluation the next step needs (order ``order + 1``).

    ``variant`` ``"bh1"`` (``B(h) = h``) or ``"bh2"`` (``B(h) = 1 - e^{-h}``); ``corrector=False``
    leaves the predictor alone (order ``order``). Warm-up at lower order on the first steps;
    ``lower_order_final``: orders ``..., 2, 1`` on the last ``order - 1`` steps (any step count).
    """
    return _unipc(x, ts, path, order, variant, lower_order_final, corrector)


@register_solver("unipc-bh1", order=3, evals_per_step=1, needs_path=True, aliases=("unipc_bh1",))
def unipc_bh1(x, ts, path=None, order: int = 2, lower_order_final: bool = True,
              corrector: bool = True):
    """UniPC with ``B(h) = h`` (UniP-2 + UniC: third order, one evaluation per step)."""
    return _unipc(x, ts, path, order, "bh1", lower_order_final, corrector)


@register_solver("unipc-bh2", order=3, evals_per_step=1, needs_path=True, aliases=("unipc_bh2",))
def unipc_bh2(x, ts, path=None, order: int = 2, lower_order_final: bool = True,
              corrector: bool = True):
    """UniPC with ``B(h) = 1 - e^{-h}`` (UniP-2 + UniC: third order, one evaluation per step)."""
    return _unipc(x, ts, path, order, "bh2", lower_order_final, corrector)
