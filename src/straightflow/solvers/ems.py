"""An exponential integrator with an empirical linear part (DPM-Solver-v3 style, in t, for flows).

DPM-Solver-v3 (Zheng et al. 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical
Model Statistics") moves the part of the network output that is linear in ``x`` into the exactly
integrated linear term, with a per-dimension coefficient ``l`` measured on the model ("empirical
model statistics": ``l = argmin E |grad_x (output - l x)|_F^2``, the expected Jacobian
diagonal), then extrapolates only the remainder. Here, for an affine path, with the data
prediction ``m = x1_hat`` (``dx/dt = (sigma'/sigma) x + B m``, ``B = alpha' - alpha sigma'/sigma``)
and ``m = l(t) * x + f``:

    x_t = Phi(t, s) x_s + int_s^t Phi(t, tau) B(tau) f(tau) dtau,
    Phi(t, tau) = (sigma_t / sigma_tau) exp(int_tau^t B l),

elementwise, with ``f`` replaced by its Lagrange polynomial in t through the last ``order``
values ``f_j = m_j - l(tau_j) x_j`` (multistep, one evaluation per step) and, with
``corrector=True``, redone with the value at ``t`` added (as UniC / ``deis-pc``; no extra NFE).
``l = 0`` is exactly ``deis`` / ``deis-pc`` (DEIS's tAB in data prediction). ``l(t)`` is given
at ``stat_times`` (per dimension) and interpolated linearly in t; the weights are Gauss-Legendre
sums, computed once per grid. v3's second statistic pair (``s, b``: ``f' ~ s f + b``) is not
used. Statistics come from :func:`straightflow.fit_solvers.fit_ems` (``l(0) = 0`` and ``l(1) = 1``
exactly: the data prediction is constant at the noise end and equals ``x`` at the data end).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..paths import AffinePath, get_path
from .base import CountedVelocity, SampleResult

__all__ = ["ems_solve", "sample_ems"]

_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)


def _lagrange(nodes: Sequence[float], tau: np.ndarray) -> np.ndarray:
    """``L_j(tau)`` for every node (rows) at the points ``tau`` (columns)."""
    out = np.ones((len(nodes), tau.size))
    for j, tj in enumerate(nodes):
        for k, tk in enumerate(nodes):
            if k != j:
                out[j] *= (tau - tk) / (tj - tk)
    return out


class _Weights:
    """``Phi(t, s)`` and ``W_j = int_s^t Phi(t, tau) B(tau) L_j(tau) dtau`` (per dimension), with
    ``log Phi(t, tau) = int_tau^t g``, ``g = sigma'/sigma + B l = (alpha' + sigma' (1 - alpha) / sigma) - B (1 - l)``:
    both terms stay finite up to t = 1 when ``l(1) = 1`` (the data prediction is ``x`` there)."""

    def __init__(self, path: AffinePath, stat_times: np.ndarray, ell: np.ndarray) -> None:
        self.path, self.st, self.ell = path, stat_times, ell  # ell: (K, D)

    def l(self, tau: np.ndarray) -> np.ndarray:  # (len(tau), D), linear in t between stat times
        return np.stack([np.interp(tau, self.st, self.ell[:, d]) for d in range(self.ell.shape[1])], 1)

    def _B_base(self, tau: np.ndarray):
        tt = torch.as_tensor(tau, dtype=torch.float64)
        a, s, da, ds = (self.path.alpha(tt).numpy(), self.path.sigma(tt).numpy(),
                        self.path.d_alpha(tt).numpy(), self.path.d_sigma(tt).numpy())
        return da - a * ds / s, da + ds * (1.0 - a) / s

    def _log_phi(self, lo: float, hi: float) -> np.ndarray:  # int_lo^hi g, (D,)
        r = lo + 0.5 * (hi - lo) * (_GL_X + 1.0)
        B, base = self._B_base(r)
        g = base[:, None] - B[:, None] * (1.0 - self.l(r))
        return (0.5 * (hi - lo) * _GL_W) @ g

    def step(self, s: float, t: float, nodes: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
        h = t - s
        tau = s + 0.5 * h * (_GL_X + 1.0)
        B, _ = self._B_base(tau)
        phi_tau = np.exp(np.stack([self._log_phi(q, t) for q in tau]))   # (Q, D)
        L = _lagrange(nodes, tau)                                         # (J, Q)
        W = np.einsum("jq,qd->jd", L * (0.5 * h * _GL_W * B)[None], phi_tau)
        return np.exp(self._log_phi(s, t)), W


def ems_solve(f, x: Tensor, ts: Sequence[float], stat_times: Sequence[float], ell: Tensor,
              path=None, order: int = 2, corrector: bool = True) -> Tensor:
    """Integrate from ``ts[0]`` to ``ts[-1]`` (increasing, ``sigma > 0`` at every step start) with the
    empirical linear part ``ell`` (``(K, *x.shape[1:])`` at ``stat_times``); see the module doc.
    A step onto ``sigma = 0`` is the extrapolated data prediction ``sum_j L_j(t) m_j`` (there
    ``x = m``; the integral form's weights diverge), as in ``deis``."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    p = get_path("linear" if path is None else path)
    st = np.asarray(stat_times, dtype=np.float64)
    if st.ndim != 1 or st.size < 2 or np.any(np.diff(st) <= 0):
        raise ValueError("stat_times must be increasing with at least 2 entries")
    shape = x.shape[1:]
    E = ell.detach().double().reshape(st.size, -1).cpu().numpy()
    if E.shape[1] != int(np.prod(shape)):
        raise ValueError(f"ell has {E.shape[1]} values per time, the state {int(np.prod(shape))}")
    wts = _Weights(p, st, E)
    tdt = dict(dtype=x.dtype, device=x.device)
    vec = lambda a: torch.as_tensor(a, **tdt).reshape(shape)  # noqa: E731
    sig = p.sigma(torch.as_tensor(list(ts), dtype=torch.float64)).tolist()
    n = len(ts) - 1

    def advance(x_s, s, t, pts):  # pts: [(tau, f, m)], the first at s
        if sig[ts.index(t)] <= 1e-12:
            L = _lagrange([q[0] for q in pts], np.array([t]))[:, 0]
            return sum(float(L[j]) * pts[j][2] for j in range(len(pts)))
        phi, W = wts.step(s, t, [q[0] for q in pts])
        return vec(phi) * x_s + sum(vec(W[j]) * pts[j][1] for j in range(len(pts)))

    hist: List[Tuple[float, Tensor, Tensor]] = []  # (tau, f, m), newest first
    prev = None
    for i in range(n):
        tt = torch.as_tensor(ts[i], **tdt)
        m = p.velocity_to_x1(f(x, ts[i], i), x, tt)
        fi = m - vec(wts.l(np.array([ts[i]]))[0]) * x  # at the point the model saw
        if prev is not None and corrector:
            x_s, older = prev
            pts = [older[0], (ts[i], fi, m)] + older[1:]
            x = advance(x_s, ts[i - 1], ts[i], pts[: order + 1])
        hist = [(ts[i], fi, m)] + hist[: order - 1]
        k = min(order, len(hist), n - i)
        prev = (x, hist[:order])
        x = advance(x, ts[i], ts[i + 1], hist[:k])
    return x


def sample_ems(model, noise: Tensor, ts: Sequence[float], stat_times: Sequence[float], ell: Tensor, cond=None,
               path=None, order: int = 2, corrector: bool = True) -> SampleResult:
    """:func:`ems_solve` on ``model`` with the NFE counted."""
    f = CountedVelocity(model, cond)
    with torch.no_grad():
        x = ems_solve(f, noise, list(ts), stat_times, ell, path, order, corrector)
    return SampleResult(x=x, nfe=f.nfe, times=torch.as_tensor(list(ts), dtype=torch.float64),
                        info={"solver": "ems", "order": order, "corrector": corrector})
