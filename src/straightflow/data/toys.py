"""2D toy distributions: ``TOYS`` registry, :func:`toy_2d`, and the fixed ``gmm`` mixture.

``checkerboard``, ``moons``, ``8gaussians``, ``spirals``, ``rings`` and ``gmm``: spread
comparable to ``N(0, I)``, all inside ``[-4, 4]^2``, drawn i.i.d. from a seeded numpy
Generator. The ``gmm`` target is fixed (it never depends on the sampling seed), with
parameters from :func:`gmm_params`: density ``sum_k w_k N(x; mu_k, Sigma_k)``,
``Sigma_k = R(a_k) diag(s_k^2) R(a_k)^T``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from ..registry import Registry
from .dataset import _check_n, _np_rng

ToyFn = Callable[[int, np.random.Generator], np.ndarray]
TOYS: Registry[ToyFn] = Registry("2D toy data set")


@TOYS.register("checkerboard")
def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # 4x4 board of 1.5-wide cells on [-3, 3]^2; the 8 "dark" cells are filled uniformly.
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=np.float64)
    c = cells[rng.integers(0, len(cells), n)]
    return 1.5 * (c + rng.random((n, 2))) - 3.0


@TOYS.register("moons", aliases=("two_moons", "2moons"))
def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    # scikit-learn's make_moons, drawn i.i.d.: make_moons spaces the angles evenly (a quasi-uniform
    # grid, not a sample), which makes W2 between two of its draws far smaller than between i.i.d.
    # samples. Upper moon (cos a, sin a), lower moon (1 - cos a, 0.5 - sin a), a ~ U(0, pi), noise 0.05.
    a = rng.random(n) * np.pi
    lower = rng.random(n) < 0.5
    x = np.stack([np.where(lower, 1.0 - np.cos(a), np.cos(a)), np.where(lower, 0.5 - np.sin(a), np.sin(a))], 1)
    x = x + 0.05 * rng.standard_normal((n, 2))
    return (x - np.array([0.5, 0.25])) * 2.0  # centred, ~[-3, 3] x [-1.5, 1.5]


@TOYS.register("8gaussians", aliases=("eight_gaussians", "8_gaussians", "gaussians8"))
def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    ang = 2 * np.pi * np.arange(8) / 8
    centers = 2.8 * np.stack([np.cos(ang), np.sin(ang)], 1)
    return centers[rng.integers(0, 8, n)] + 0.2 * rng.standard_normal((n, 2))


@TOYS.register("spirals", aliases=("spiral", "2spirals", "two_spirals"))
def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    # Two interleaved arms, 1.5 turns each, radius up to ~3.
    t = np.sqrt(rng.random(n)) * 3 * np.pi
    r = 0.2 + 2.8 * t / (3 * np.pi)
    arm = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    pts = arm[:, None] * np.stack([r * np.cos(t), r * np.sin(t)], 1)
    return pts + 0.08 * rng.standard_normal((n, 2))


@TOYS.register("rings", aliases=("circles", "concentric_circles"))
def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    # Four concentric circles, radii 0.75..3, mass proportional to circumference.
    radii = np.array([0.75, 1.5, 2.25, 3.0])
    k = rng.choice(4, size=n, p=radii / radii.sum())
    a = rng.random(n) * 2 * np.pi
    r = radii[k] + 0.06 * rng.standard_normal(n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


# Fixed mixture (the distribution never depends on the sampling seed, so held-out samples
# drawn with another seed come from the same target).
_GMM_WEIGHTS = np.array([0.25, 0.2, 0.15, 0.15, 0.15, 0.10])
_GMM_MEANS = np.array([[-1.8, -1.2], [1.5, 1.6], [1.9, -1.5], [-1.2, 1.9], [0.1, 0.0], [-2.4, 0.6]])
_GMM_SCALES = np.array([[0.45, 0.25], [0.30, 0.50], [0.35, 0.35], [0.25, 0.20], [0.40, 0.15], [0.20, 0.30]])
_GMM_ANGLES = np.array([0.5, -0.3, 0.0, 1.1, 0.8, -0.9])


def gmm_params(dtype: torch.dtype = torch.float64) -> Dict[str, Tensor]:
    """The fixed ``gmm`` toy mixture: ``weights (K,)``, ``means (K, 2)``, ``covs (K, 2, 2)``."""
    c, s = np.cos(_GMM_ANGLES), np.sin(_GMM_ANGLES)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (K, 2, 2)
    covs = rot @ (np.eye(2)[None] * (_GMM_SCALES**2)[:, None, :]) @ np.swapaxes(rot, 1, 2)
    return {
        "weights": torch.tensor(_GMM_WEIGHTS, dtype=dtype),
        "means": torch.tensor(_GMM_MEANS, dtype=dtype),
        "covs": torch.tensor(covs, dtype=dtype),
    }


@TOYS.register("gmm", aliases=("gaussian_mixture", "mixture"))
def _gmm(n: int, rng: np.random.Generator) -> np.ndarray:
    p = gmm_params()
    chol = np.linalg.cholesky(p["covs"].numpy())
    k = rng.choice(len(_GMM_WEIGHTS), size=n, p=_GMM_WEIGHTS)
    z = rng.standard_normal((n, 2))
    return _GMM_MEANS[k] + np.einsum("nij,nj->ni", chol[k], z)


def toy_2d(name: str, n: int, seed: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` samples ``(n, 2)`` float32 of a 2D toy (see ``TOYS.names()``); ``generator`` overrides ``seed``."""
    fn = TOYS.get(name)
    n = _check_n(n)
    x = fn(n, _np_rng(seed, generator))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
