"""Exact flows for Gaussian-mixture targets: a ground-truth velocity model for tests and benchmarks.

The target is ``x1 ~ sum_k pi_k N(mu_k, Sigma_k)``, the source ``x0 ~ N(0, I)`` and the path any
affine path ``x_t = alpha(t) x1 + sigma(t) x0`` (see :mod:`straightflow.paths`). Then
``x_t | k ~ N(alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + sigma^2 I`` and every quantity a
trained model approximates is available in closed form:

* responsibilities ``r_k(x) ∝ pi_k N(x; alpha mu_k, C_k)`` (log-sum-exp),
* ``E[x1 | x_t, k] = mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)``,
* ``E[x0 | x_t, k] = sigma C_k^{-1} (x - alpha mu_k)``,
* score ``grad log p_t(x) = -sum_k r_k C_k^{-1} (x - alpha mu_k)``,
* velocity ``v(x, t) = alpha'(t) E[x1 | x_t] + sigma'(t) E[x0 | x_t]`` (``= E[x1 - x0 | x_t]`` on
  the linear path): the marginal velocity whose ODE transports ``N(0, I)`` to the mixture exactly.

Each ``Sigma_k = U_k diag(lambda_k) U_k^T`` is eigendecomposed once at construction, so that
``C_k^{-1} = U_k diag(1 / (alpha^2 lambda_k + sigma^2)) U_k^T`` costs one rotation at any ``t``
(no rotation at all when every covariance is diagonal). Parameters are kept in float64 on the
CPU; computations follow the dtype and device of ``x`` (casts are cached).

Conditioning: ``y`` (a (B,) integer tensor of component indices) restricts the mixture to one
component per row (an exact class-conditional flow, e.g. for guidance tests); rows with ``y < 0``
stay unconditional (the usual "null label").
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .paths import PathSpec, get_path

__all__ = ["GaussianMixtureFlow"]

_LOG_2PI = math.log(2 * math.pi)


def _f64(x, name: str) -> Tensor:
    try:
        out = torch.as_tensor(x, dtype=torch.float64).detach().to("cpu").clone()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be array-like of numbers: {e}") from None
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} contains non-finite values")
    return out


class GaussianMixtureFlow:
    """Exact velocity / posterior / score / density of a Gaussian-mixture target on an affine path.

    Args:
        means: (K, D) component means.
        covs: (K, D, D) full covariances, or one (D, D) covariance shared by all components.
        stds: isotropic per-component standard deviations, (K,) or a scalar
            (``Sigma_k = stds_k^2 I``). Give ``covs`` or ``stds``, not both; neither means ``I``.
        weights: (K,) nonnegative mixture weights; ``None`` is uniform. Weights that do not sum
            to 1 are normalised (their sum must be positive).
        path: name, config dict or :class:`~straightflow.paths.AffinePath`.

    Raises ``ValueError`` for shape mismatches, non-finite values, non-symmetric or non positive
    definite covariances, nonpositive stds and negative weights.

    The object is a velocity model ``model(x, t, **cond)``: ``x`` is (B, D) (or (B, *S) with
    ``prod(S) = D``; the output has ``x``'s shape), ``t`` a scalar or (B,). Every ``__call__``
    increments :attr:`nfe` by one (``reset_nfe()`` sets it to 0); the other methods do not count.
    """

    def __init__(
        self,
        means,
        covs=None,
        stds=None,
        weights=None,
        path: PathSpec = "linear",
    ) -> None:
        mu = _f64(means, "means")
        if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
            raise ValueError(
                f"means must have shape (K, D) with K, D >= 1, got {tuple(mu.shape)} "
                "(for a 1D mixture pass means of shape (K, 1))"
            )
        K, D = mu.shape
        if covs is not None and stds is not None:
            raise ValueError("give either covs or stds, not both")
        if covs is not None:
            S = _f64(covs, "covs")
            if S.shape == (D, D):
                S = S.expand(K, D, D).clone()
            if S.shape != (K, D, D):
                raise ValueError(f"covs must have shape (K, D, D) = {(K, D, D)} or (D, D), got {tuple(S.shape)}")
            asym = (S - S.transpose(-1, -2)).abs().amax()
            if asym > 1e-8 * max(1.0, float(S.abs().amax())):
                raise ValueError(f"covs must be symmetric (max |Sigma - Sigma^T| = {float(asym):.3g})")
            S = 0.5 * (S + S.transpose(-1, -2))
        else:
            sd = _f64(1.0 if stds is None else stds, "stds")
            if sd.ndim == 0:
                sd = sd.expand(K).clone()
            if sd.shape != (K,):
                raise ValueError(f"stds must be a scalar or have shape (K,) = ({K},), got {tuple(sd.shape)}")
            if (sd <= 0).any():
                raise ValueError(f"stds must be positive, got {sd.tolist()}")
            S = torch.diag_embed(sd[:, None].expand(K, D) ** 2)
        if weights is None:
            w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            w = _f64(weights, "weights")
            if w.shape != (K,):
                raise ValueError(f"weights must have shape (K,) = ({K},), got {tuple(w.shape)}")
            if (w < 0).any() or float(w.sum()) <= 0:
                raise ValueError(f"weights must be nonnegative with a positive sum, got {w.tolist()}")
            w = w / w.sum()

        offdiag = S - torch.diag_embed(torch.diagonal(S, dim1=-2, dim2=-1))
        self._diag = bool((offdiag == 0).all())
        if self._diag:
            lam = torch.diagonal(S, dim1=-2, dim2=-1).clone()
            U = None
        else:
            lam, U = torch.linalg.eigh(S)
        bad = (lam <= 0).any(-1)
        if bad.any():
            k = int(bad.nonzero()[0])
            raise ValueError(
                f"covariance of component {k} is not positive definite "
                f"(min eigenvalue {float(lam[k].min()):.3g})"
            )

        self.path = get_path(path)
        self._mu, self._cov, self._w, self._lam, self._U = mu, S, w, lam, U
        self._cache: Dict[Tuple[torch.dtype, torch.device], Dict[str, Tensor]] = {}
        self.nfe = 0

    # ------------------------------------------------------------------ constructors
    @classmethod
    def random(
        cls,
        dim: int,
        n_components: int = 8,
        seed: int = 0,
        path: PathSpec = "linear",
        scale: float = 2.5,
    ) -> "GaussianMixtureFlow":
        """A reproducible random mixture: spread-out means in a ball of radius ``scale``
        (farthest-point selection), random rotations, component stds ``~ min(0.5, 0.3 d_min)``
        (``d_min`` the smallest distance between means) with per-axis factors in [0.6, 1.4]
        (variance anisotropy <= 5.5), and weights in [0.5, 1.5] normalised."""
        if dim < 1 or n_components < 1:
            raise ValueError(f"need dim >= 1 and n_components >= 1, got {dim}, {n_components}")
        g = torch.Generator().manual_seed(int(seed))
        K = int(n_components)
        n_cand = max(64 * K, 512)
        d = torch.randn(n_cand, dim, generator=g, dtype=torch.float64)
        r = torch.rand(n_cand, 1, generator=g, dtype=torch.float64) ** (1.0 / dim)
        cand = scale * r * d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        idx = [int(torch.randint(n_cand, (1,), generator=g))]
        dist = (cand - cand[idx[0]]).norm(dim=1)
        for _ in range(K - 1):
            j = int(dist.argmax())
            idx.append(j)
            dist = torch.minimum(dist, (cand - cand[j]).norm(dim=1))
        means = cand[idx]
        if K > 1:
            pd = torch.cdist(means, means) + torch.eye(K, dtype=torch.float64) * 1e9
            dmin = float(pd.min())
        else:
            dmin = float(scale)
        base = min(0.5, 0.3 * dmin)
        covs = []
        for _ in range(K):
            q, rr = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
            sgn = torch.sign(torch.diagonal(rr))
            q = q * torch.where(sgn == 0, torch.ones_like(sgn), sgn)
            f = 0.6 + 0.8 * torch.rand(dim, generator=g, dtype=torch.float64)
            covs.append(q @ torch.diag((base * f) ** 2) @ q.T)
        weights = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
        return cls(means, covs=torch.stack(covs), weights=weights, path=path)

    @classmethod
    def eight_gaussians(cls, path: PathSpec = "linear", radius: float = 2.0, std: float = 0.2) -> "GaussianMixtureFlow":
        """The 2D ring of 8 equal-weight isotropic Gaussians at angles ``k pi / 4``."""
        ang = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        return cls(means, stds=std, path=path)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self._mu.shape[1]

    @property
    def n_components(self) -> int:
        return self._mu.shape[0]

    @property
    def means(self) -> Tensor:
        """(K, D) float64 copy."""
        return self._mu.clone()

    @property
    def covs(self) -> Tensor:
        """(K, D, D) float64 copy."""
        return self._cov.clone()

    @property
    def weights(self) -> Tensor:
        """(K,) float64 copy, normalised."""
        return self._w.clone()

    def reset_nfe(self) -> None:
        self.nfe = 0

    def __repr__(self) -> str:
        return (
            f"GaussianMixtureFlow(K={self.n_components}, D={self.dim}, path={self.path!r}, "
            f"diagonal={self._diag})"
        )

    # ------------------------------------------------------------------ exact moments
    def mean(self, t: float = 1.0) -> Tensor:
        """Exact mean of the marginal at time ``t`` (float64, (D,)); ``t = 1`` is the target."""
        a = float(self.path.alpha(torch.as_tensor(float(t), dtype=torch.float64)))
        return a * (self._w[:, None] * self._mu).sum(0)

    def covariance(self, t: float = 1.0) -> Tensor:
        """Exact covariance of the marginal at time ``t`` (float64, (D, D)):
        ``alpha^2 Cov[x1] + sigma^2 I`` with ``Cov[x1] = sum_k pi_k (Sigma_k + mu_k mu_k^T) - m m^T``."""
        tt = torch.as_tensor(float(t), dtype=torch.float64)
        a, s = float(self.path.alpha(tt)), float(self.path.sigma(tt))
        m = (self._w[:, None] * self._mu).sum(0)
        second = (self._w[:, None, None] * (self._cov + self._mu[:, :, None] * self._mu[:, None, :])).sum(0)
        cov1 = second - torch.outer(m, m)
        return a * a * cov1 + s * s * torch.eye(self.dim, dtype=torch.float64)

    # ------------------------------------------------------------------ internals
    def _params(self, dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
        key = (dtype, torch.device(device))
        p = self._cache.get(key)
        if p is None:
            p = {
                "mu": self._mu.to(device=device, dtype=dtype),
                "lam": self._lam.to(device=device, dtype=dtype),
                "logw": torch.log(self._w).to(device=device, dtype=dtype),
            }
            if self._U is not None:
                p["U"] = self._U.to(device=device, dtype=dtype)
            self._cache[key] = p
        return p

    def _prep(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}) (or (B, *S) with prod(S) = {self.dim}), got {tuple(x.shape)}")
        B = x.shape[0]
        x2 = x.reshape(B, self.dim)
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(B)
        elif tt.numel() == B:
            tt = tt.reshape(B)
        else:
            raise ValueError(f"t must be a scalar or have B = {B} entries, got shape {tuple(tt.shape)}")
        return x2, tt

    def _core(self, x2: Tensor, tt: Tensor, y: Optional[Tensor]):
        """Per-component quantities at (x, t): responsibilities r (B, K), z = C^{-1} diff in the
        eigenbasis (B, K, D), log N_k (B, K), alpha, sigma (B,)."""
        P = self._params(x2.dtype, x2.device)
        a, s = self.path.alpha(tt), self.path.sigma(tt)
        a3, s3 = a[:, None, None], s[:, None, None]
        diff = x2[:, None, :] - a3 * P["mu"][None]  # (B, K, D)
        yy = diff if self._diag else torch.einsum("bkd,kde->bke", diff, P["U"])
        var = a3 * a3 * P["lam"][None] + s3 * s3  # eigenvalues of C_k
        z = yy / var
        logn = -0.5 * ((yy * z).sum(-1) + torch.log(var).sum(-1) + self.dim * _LOG_2PI)  # (B, K)
        logits = P["logw"][None] + logn
        r = torch.softmax(logits, dim=-1)
        cmask = None
        if y is not None:
            y = torch.as_tensor(y, device=x2.device)
            if y.is_floating_point() or y.shape != (x2.shape[0],):
                raise ValueError(f"y must be an integer tensor of shape ({x2.shape[0]},), got {y.dtype} {tuple(y.shape)}")
            if (y >= self.n_components).any():
                raise ValueError(f"y must be < n_components = {self.n_components} (negative = unconditional)")
            cmask = y >= 0
            onehot = torch.nn.functional.one_hot(y.clamp_min(0).long(), self.n_components).to(r.dtype)
            r = torch.where(cmask[:, None], onehot, r)
        return P, r, z, logits, logn, cmask, a, s

    def _rotate_back(self, P, c: Tensor) -> Tensor:
        """``sum_k U_k c_k`` for c (B, K, D) in the eigenbases -> (B, D)."""
        if self._diag:
            return c.sum(1)
        return torch.einsum("bke,kde->bd", c, P["U"])

    def _posteriors(self, x: Tensor, t, y) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        x2, tt = self._prep(x, t)
        P, r, z, _, _, _, a, s = self._core(x2, tt, y)
        rz = r[..., None] * z
        m0 = self._rotate_back(P, rz)  # sum_k r_k C_k^{-1} diff_k
        x1 = r @ P["mu"] + a[:, None] * self._rotate_back(P, rz * P["lam"][None])
        x0 = s[:, None] * m0
        return x1, x0, m0, tt

    # ------------------------------------------------------------------ public API
    def posterior_x1(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        """``E[x1 | x_t = x]`` (exact), same shape as ``x``."""
        return self._posteriors(x, t, y)[0].reshape(x.shape)

    def posterior_x0(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        """``E[x0 | x_t = x]`` (exact), same shape as ``x``."""
        return self._posteriors(x, t, y)[1].reshape(x.shape)

    def score(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        """``grad_x log p_t(x)`` (exact; conditional on ``y`` if given)."""
        return (-self._posteriors(x, t, y)[2]).reshape(x.shape)

    def log_prob(self, x: Tensor, t=1.0, y: Optional[Tensor] = None) -> Tensor:
        """``log p_t(x)`` of the marginal at time ``t`` (default 1: the target), shape (B,)."""
        x2, tt = self._prep(x, t)
        _, _, _, logits, logn, cmask, _, _ = self._core(x2, tt, y)
        lp = torch.logsumexp(logits, dim=-1)
        if cmask is not None:
            lk = logn.gather(1, torch.as_tensor(y, device=x2.device).clamp_min(0).long()[:, None])[:, 0]
            lp = torch.where(cmask, lk, lp)
        return lp

    def velocity(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        """Marginal velocity ``alpha' E[x1|x_t] + sigma' E[x0|x_t]`` without counting an NFE."""
        x1, x0, _, tt = self._posteriors(x, t, y)
        da, ds = self.path.d_alpha(tt)[:, None], self.path.d_sigma(tt)[:, None]
        return (da * x1 + ds * x0).reshape(x.shape)

    def __call__(self, x: Tensor, t, y: Optional[Tensor] = None, **cond) -> Tensor:
        """Velocity model interface; counts one function evaluation. Conditioning keywords other
        than ``y`` are accepted only when ``None`` (a ``TypeError`` otherwise, so a mistyped
        condition is not silently ignored)."""
        extra = [k for k, v in cond.items() if v is not None]
        if extra:
            raise TypeError(f"GaussianMixtureFlow accepts only the conditioning keyword 'y', got {extra}")
        self.nfe += 1
        return self.velocity(x, t, y)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _where(generator, dtype, device):
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        return (dtype or torch.get_default_dtype()), torch.device(device)

    def sample(
        self,
        n: int,
        generator: Optional[torch.Generator] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        return_labels: bool = False,
    ):
        """``n`` exact samples of the target (t = 1), (n, D). Drawn in float64 then cast to
        ``dtype`` (default: torch's default dtype) on ``device`` (default: the generator's).
        With ``return_labels`` also the (n,) component indices."""
        dtype, device = self._where(generator, dtype, device)
        P = self._params(torch.float64, device)
        w = self._w.to(device)
        if int(n) < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if int(n) == 0:
            k = torch.zeros(0, dtype=torch.long, device=device)
        else:
            k = torch.multinomial(w, int(n), replacement=True, generator=generator)
        eps = torch.randn(int(n), self.dim, generator=generator, dtype=torch.float64, device=device)
        out = torch.empty_like(eps)
        for j in range(self.n_components):
            sel = k == j
            e = eps[sel] * P["lam"][j].sqrt()
            out[sel] = P["mu"][j] + (e if self._diag else e @ P["U"][j].T)
        out = out.to(dtype)
        return (out, k) if return_labels else out

    def sample_source(self, n: int, generator: Optional[torch.Generator] = None, dtype=None, device=None) -> Tensor:
        """``n`` samples of the source N(0, I), (n, D)."""
        dtype, device = self._where(generator, dtype, device)
        return torch.randn(int(n), self.dim, generator=generator, dtype=torch.float64, device=device).to(dtype)

    def sample_marginal(self, t, n: int, generator: Optional[torch.Generator] = None, dtype=None, device=None) -> Tensor:
        """``n`` exact samples of ``x_t = alpha(t) x1 + sigma(t) x0`` for a scalar ``t``."""
        dtype, device = self._where(generator, dtype, device)
        tt = torch.as_tensor(t, dtype=torch.float64)
        if tt.ndim != 0:
            raise ValueError(f"sample_marginal needs a scalar t, got shape {tuple(tt.shape)}")
        x1 = self.sample(n, generator, dtype=torch.float64, device=device)
        x0 = self.sample_source(n, generator, dtype=torch.float64, device=device)
        a, s = self.path.alpha(tt).to(device), self.path.sigma(tt).to(device)
        return (a * x1 + s * x0).to(dtype)
