"""The log-SNR toolkit shared by the exponential integrators (DPM-Solver++, UniPC, DEIS).

On an affine path ``x_t = alpha(t) x1 + sigma(t) x0`` these solvers work with

* ``lam(t) = log(alpha / sigma)`` (half the path's ``log_snr``), ``-inf`` where ``alpha = 0`` and
  ``+inf`` where ``sigma = 0``; values of alpha, sigma below ``ZERO = 1e-12`` count as 0
  (``cos(pi / 2)`` is 6e-17 in floating point, not 0);
* the data prediction ``m = x1_hat = c_x x + c_v v`` with ``c_x = sigma' / det``,
  ``c_v = -sigma / det``, ``det = alpha sigma' - sigma alpha'`` (the inverse of
  ``(x, v) = (alpha x1 + sigma x0, alpha' x1 + sigma' x0)``);
* ``H_k(h) = h^k phi_k(-h) = int_0^h e^{u - h} u^{k-1} / (k-1)! du``, so ``H_1 = 1 - e^{-h}`` and
  ``H_{k+1} = h^k / k! - H_k``, the weights of ``m`` and its ``lam``-derivatives in the exact
  solution ``x_t = (sigma_t / sigma_s) x_s + alpha_t sum_k H_{k+1}(h) m^{(k)}(lam_s)``,
  ``h = lam_t - lam_s``.

Every helper here is a scalar function of the grid or one linear combination of tensors.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ..paths import AffinePath, PathLike, get_path
from .base import lincomb

__all__ = ["ZERO", "as_path", "alpha_sigma", "alpha_sigma_lambda", "t_of_lambda", "x1_coefficients",
           "x1_from_velocity", "hphi", "first_order_step", "derivative_weights", "push_history", "order_now"]

ZERO = 1e-12
"""|alpha|, |sigma| below this count as 0 (the path's endpoints)."""

Point = Tuple[float, float, float]  # (alpha, sigma, lam) at one time


def as_path(path: PathLike) -> AffinePath:
    """The path object for a name, config or path; ``None`` is the linear path."""
    return get_path("linear" if path is None else path)


def alpha_sigma(path: AffinePath, ts) -> Tuple[Tensor, Tensor]:
    """``alpha(t), sigma(t)`` at the times ``ts`` as float64 tensors, values below ``ZERO`` set to 0."""
    tt = torch.as_tensor(ts, dtype=torch.float64)
    a, s = path.alpha(tt), path.sigma(tt)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(a.abs() < ZERO, zero, a), torch.where(s.abs() < ZERO, zero, s)


def alpha_sigma_lambda(path: AffinePath, ts: Sequence[float]) -> List[Point]:
    """``(alpha, sigma, lam)`` as Python floats at every time of ``ts``, ``lam = log alpha - log sigma``
    (``-inf`` at ``alpha = 0``, ``+inf`` at ``sigma = 0``), in one vectorised evaluation of the path."""
    A, S = (v.tolist() for v in alpha_sigma(path, ts))
    return [(a, s, -math.inf if a <= 0.0 else (math.inf if s <= 0.0 else math.log(a) - math.log(s)))
            for a, s in zip(A, S)]


def t_of_lambda(path: AffinePath, lam: float) -> float:
    """Time with ``log(alpha / sigma) = lam`` (the path's ``t_from_log_snr`` of ``2 lam``)."""
    return float(path.t_from_log_snr(torch.tensor(2.0 * lam, dtype=torch.float64)))


def x1_coefficients(path: AffinePath, ts: Sequence[float]) -> List[Tuple[float, float]]:
    """``(c_x, c_v)`` with ``x1_hat = c_x x + c_v v`` at every grid time: ``c_x = sigma' / det``,
    ``c_v = -sigma / det``, ``det = alpha sigma' - sigma alpha'`` (``|det| < ZERO`` clamped to ``+-ZERO``)."""
    tt = torch.as_tensor(ts, dtype=torch.float64)
    a, s, da, ds = path.alpha(tt), path.sigma(tt), path.d_alpha(tt), path.d_sigma(tt)
    det = a * ds - s * da
    det = torch.where(det.abs() < ZERO, torch.full_like(det, ZERO) * torch.where(det < 0, -1.0, 1.0), det)
    return list(zip((ds / det).tolist(), (-s / det).tolist()))


def x1_from_velocity(c: Tuple[float, float], x: Tensor, v: Tensor) -> Tensor:
    """``x1_hat = c_x x + c_v v`` for ``c`` from :func:`x1_coefficients` (one pass when ``c_x = 1``)."""
    cx, cv = c
    return torch.add(x, v, alpha=cv) if cx == 1.0 else lincomb([(cx, x), (cv, v)])


def hphi(k: int, h: float) -> float:
    """``H_k(h) = h^k phi_k(-h) = int_0^h e^{u - h} u^{k-1} / (k-1)! du`` (a series for ``|h| < 1``,
    else ``H_1 = 1 - e^{-h}``, ``H_{j+1} = h^j / j! - H_j``)."""
    if abs(h) < 1.0:
        term, total = h**k / math.factorial(k), 0.0
        for j in range(40):
            total += term
            term *= -h / (k + j + 1)
        return total
    val = -math.expm1(-h)  # H_1
    for j in range(1, k):
        val = h**j / math.factorial(j) - val  # H_{j+1} = h^j / j! - H_j
    return val


def first_order_step(path: AffinePath, x: Tensor, m: Tensor, v: Tensor, t_s: float, ab_s: Point, ab_t: Point) -> Tensor:
    """DDIM / DPM-Solver++(1): ``x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) m_s`` in its finite
    ratio form ``r x_s + (alpha_t - alpha_s r) m_s``, ``r = sigma_t / sigma_s``; from ``sigma_s = 0``
    (inversion starting at the data) the equal form ``alpha_t m_s + sigma_t x0_hat_s``."""
    a_s, s_s, _ = ab_s
    a_t, s_t, _ = ab_t
    if s_s > 0.0:
        r = s_t / s_s
        return r * x + (a_t - a_s * r) * m
    x0 = path.velocity_to_x0(v, x, torch.as_tensor(t_s, dtype=x.dtype, device=x.device))
    return a_t * m + s_t * x0


def derivative_weights(lams: List[float]) -> List[List[float]]:
    """Weights ``w[d][j]`` with ``m^{(d+1)}(lam_0) = sum_j w[d][j] m_j`` for the polynomial through
    ``(lams[j], m_j)`` (newest first, at most 3 points): the divided differences
    ``m' = f01 + (lam_0 - lam_1) f012``, ``m'' = 2 f012`` as scalars, so a step is one linear combination."""
    if len(lams) == 1:
        return []
    l0, l1 = lams[0], lams[1]
    f01 = [1.0 / (l0 - l1), -1.0 / (l0 - l1), 0.0]
    if len(lams) == 2:
        return [f01[:2]]
    l2 = lams[2]
    f12 = [0.0, 1.0 / (l1 - l2), -1.0 / (l1 - l2)]
    f012 = [(a - b) / (l0 - l2) for a, b in zip(f01, f12)]
    return [[a + (l0 - l1) * b for a, b in zip(f01, f012)], [2.0 * b for b in f012]]


def push_history(hist: List[Tuple[float, Tensor]], lam: float, m: Tensor, order: int) -> List[Tuple[float, Tensor]]:
    """Append ``(lam, m)`` keeping the newest ``order`` points; an evaluation at infinite ``lam``
    (t = 0 or t = 1) is unusable as history, so it empties it (the multistep method warms up again)."""
    return (hist + [(lam, m)])[-order:] if math.isfinite(lam) else []


def order_now(order: int, n_hist: int, i: int, n: int, lower_order_final: bool, lam_s: float, lam_t: float) -> int:
    """Order of step ``i`` of ``n``: ``min(order, n_hist)`` (warm-up), at most ``n - i`` when
    ``lower_order_final`` and ``n < 15`` (as the reference implementations do), 1 at an infinite lam."""
    k = min(order, max(n_hist, 1))
    if lower_order_final and n < 15:
        k = min(k, n - i)
    if not (math.isfinite(lam_s) and math.isfinite(lam_t)):
        k = 1
    return k
