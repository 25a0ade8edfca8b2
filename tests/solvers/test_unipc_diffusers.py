"""UniPC against diffusers' UniPCMultistepScheduler (flow prediction), the reference implementation.

Defects fixed: (1) order 3 on >= 15 steps and order 2 on grids that stop short of t = 1 kept the
full order on the last steps (the lowering applied only below 15 steps, as DPM-Solver++ does;
UniPC's reference code always lowers): 2-9x less accurate; (2) the evaluation at t = 0
(lam = -inf) was discarded, so the first step was not corrected: 1.1-2x behind diffusers at NFE 3-5
on diffusers' and our default grids. Same grid: identical to float32 rounding (diffusers keeps
its sigmas in float32).
"""
import warnings

import pytest
import torch

from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import sample

diffusers = pytest.importorskip("diffusers")


def _diffusers_unipc(o, x, steps, order=2, sigmas=None):
    sch = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=1.0, solver_order=order)
    sch.set_timesteps(steps)
    if sigmas is not None:
        sch.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in sch.timesteps:
            i = 0 if sch.step_index is None else sch.step_index
            s = float(sch.sigmas[i])
            x = sch.step(-o(x, torch.full((x.shape[0],), 1.0 - s, dtype=x.dtype)), t, x, return_dict=False)[0]
    return x, [float(v) for v in sch.sigmas]


@pytest.fixture(scope="module")
def field():
    o = GaussianMixtureFlow.random(dim=8, n_components=4, seed=3)
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return o, z


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("order,steps", [(2, 4), (2, 16), (3, 6), (3, 16), (3, 20)])
def test_same_grid_as_diffusers(field, order, steps):
    """On diffusers' own flow sigmas (1 - 1e-6, ..., 0) both give the same endpoint; before the fix
    order 3 at 16/20 steps differed by 2-8x in error (2e-2 relative difference here)."""
    o, z = field
    ref, sig = _diffusers_unipc(o, z, steps, order)
    ours = sample(o, z, solver="unipc", grid=1 - torch.tensor(sig, dtype=torch.float64), order=order).x
    assert rel(ours, ref) < 1e-5


@pytest.mark.parametrize("steps", [5, 20])
def test_grid_stopping_short_of_one(field, steps):
    o, z = field
    g = torch.linspace(0, 0.98, steps + 1, dtype=torch.float64)
    g[0] = 1e-6  # diffusers cannot start at sigma = 1 exactly (log 0 in its log-SNR)
    ref, _ = _diffusers_unipc(o, z, steps, 2, sigmas=(1 - g).tolist())
    ours = sample(o, z, solver="unipc", grid=g).x
    assert rel(ours, ref) < 1e-5


def test_default_grids_at_least_level_with_diffusers(oracle, noise):
    """Each library's default grid (ours: uniform 0 -> 1; diffusers: shipped sigmas), NFE 3-10:
    before the fix ours had 1.28, 2.01, 1.58x diffusers' error at NFE 3, 4, 5 (2D oracle of the
    benchmark); the grids still differ slightly, hence the 1 % allowance."""
    exact = sample(oracle, noise, solver="dopri5", steps=1, rtol=1e-10, atol=1e-10).x
    for n in range(3, 11):
        ours = (sample(oracle, noise, solver="unipc", steps=n).x - exact).pow(2).mean().sqrt()
        theirs = (_diffusers_unipc(oracle, noise, n)[0] - exact).pow(2).mean().sqrt()
        assert ours <= 1.01 * theirs, (n, float(ours), float(theirs))
