"""DPM-Solver++ and UniPC on the exact oracle field: orders, NFE, endpoints, other paths, inversion.

Convergence orders are measured on ``[T_MIN, 1 - T_MIN]`` with a grid uniform in
``lam = log(alpha / sigma)`` and ``lower_order_final=False``: on the full ``[0, 1]`` the steps
that start at ``lam = -inf`` (t = 0) or end at ``lam = +inf`` (t = 1) are first order by
construction (their ``h`` is infinite), and the step after t = 0 warms up again, so the endpoint
steps would dominate the error and hide the order of the interior method. Step counts are
chosen past the pre-asymptotic range (at coarse steps a few samples still change mixture
component, which makes the slope erratic).
"""
import math

import pytest
import torch

import straightflow.solvers.dpm  # noqa: F401  (registers dpm++*)
import straightflow.solvers.unipc  # noqa: F401  (registers unipc*)
from straightflow.oracle import GaussianMixtureFlow
from straightflow.paths import get_path
from straightflow.solvers import available, get_solver, invert, sample

T_MIN = 0.02
MULTISTEP = ["dpm++1", "dpm++2m", "dpm++3m", "unipc", "unipc-bh1", "unipc-bh2"]
NEW = MULTISTEP + ["dpm++2s", "dpm++3s"]


def lam_grid(steps, path="linear", t_min=T_MIN, t_max=1 - T_MIN):
    """Grid uniform in the log-SNR between two interior times (both kept exactly)."""
    p = get_path(path)
    lo, hi = (float(p.log_snr(torch.tensor(t, dtype=torch.float64))) for t in (t_min, t_max))
    g = p.t_from_log_snr(torch.linspace(lo, hi, steps + 1, dtype=torch.float64))
    g[0], g[-1] = t_min, t_max
    return g


def rmse(a, b):
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def setups(oracle, noise):
    """Per dimension: oracle, noise and an RK4 reference on the interior interval (800 steps)."""
    o16 = GaussianMixtureFlow.random(dim=16, n_components=4, seed=1)
    n16 = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {}
    for dim, o, z in ((2, oracle, noise), (16, o16, n16)):
        out[dim] = (o, z, sample(o, z, solver="rk4", grid=lam_grid(800)).x)
    return out


# (solver, theoretical order, dim, step counts): the slope between the last two is checked.
ORDER_CASES = [
    ("dpm++2m", 2, 2, (32, 64)), ("dpm++3m", 3, 2, (32, 64)), ("dpm++2s", 2, 2, (32, 64)),
    ("dpm++3s", 3, 2, (64, 128)), ("unipc-bh2", 3, 2, (32, 64)),
    ("dpm++2m", 2, 16, (64, 128)), ("dpm++3m", 3, 16, (64, 128)), ("dpm++2s", 2, 16, (64, 128)),
    ("unipc-bh2", 3, 16, (64, 128)),
]


@pytest.mark.parametrize("solver,order,dim,steps", ORDER_CASES)
def test_empirical_order(setups, solver, order, dim, steps):
    o, z, ref = setups[dim]
    opts = {} if solver.endswith("s") else {"lower_order_final": False}
    errs = [rmse(sample(o, z, solver=solver, grid=lam_grid(n), **opts).x, ref) for n in steps]
    slope = math.log2(errs[0] / errs[1]) / math.log2(steps[1] / steps[0])
    assert abs(slope - order) < 0.4, (solver, dim, errs, slope)
    assert get_solver(solver).order == order


def test_unipc_corrector_raises_the_order(setups):
    o, z, ref = setups[2]
    slopes = {}
    for corr in (False, True):
        e = [rmse(sample(o, z, solver="unipc-bh1", grid=lam_grid(n), lower_order_final=False,
                         corrector=corr).x, ref) for n in (32, 64)]
        slopes[corr] = math.log2(e[0] / e[1])
    assert abs(slopes[False] - 2) < 0.4 and abs(slopes[True] - 3) < 0.4, slopes


@pytest.mark.parametrize("grid", ["uniform", "logsnr", "shifted"])
def test_dpmpp1_is_euler_on_the_linear_path(oracle, noise, grid):
    a = sample(oracle, noise, solver="dpm++1", steps=7, grid=grid)
    b = sample(oracle, noise, solver="euler", steps=7, grid=grid)
    assert (a.x - b.x).abs().max().item() < 1e-12
    assert a.nfe == b.nfe == 7
    # inversion too, including the first step from t = 1 (sigma = 0)
    ia = invert(oracle, a.x, solver="dpm++1", steps=7, grid=grid).x
    ib = invert(oracle, a.x, solver="euler", steps=7, grid=grid).x
    assert (ia - ib).abs().max().item() < 1e-12


@pytest.mark.parametrize("solver", NEW)
def test_nfe_counts(oracle, noise, solver):
    spec = get_solver(solver)
    oracle.reset_nfe()
    interior = sample(oracle, noise[:16], solver=solver, grid=lam_grid(6))
    assert interior.nfe == oracle.nfe == spec.evals_per_step * 6  # every step at full order inside (0, 1)
    full = sample(oracle, noise[:16], solver=solver, steps=6)
    assert full.nfe == spec.nfe(6)  # spec.nfe is exact on the uniform grid of [0, 1] (read off the protocol)
    if solver in MULTISTEP:
        assert full.nfe == 6  # one evaluation per step, the corrector included
    else:  # the first (from lam = -inf) and the last (to lam = +inf) steps are first order
        assert full.nfe == spec.evals_per_step * 6 - 2 * (spec.evals_per_step - 1)


def test_registry():
    expect = {"dpm++1": (1, 1), "dpm++2m": (2, 1), "dpm++3m": (3, 1), "dpm++2s": (2, 2),
              "dpm++3s": (3, 3), "unipc": (3, 1), "unipc-bh1": (3, 1), "unipc-bh2": (3, 1)}
    assert set(expect) <= set(available())
    for name, (order, evals) in expect.items():
        spec = get_solver(name)
        assert (spec.order, spec.evals_per_step, spec.needs_path) == (order, evals, True)
    assert get_solver("dpmpp_2m").name == "dpm++2m"


@pytest.mark.parametrize("path", ["cosine", "vp"])
def test_other_paths_finite_and_converging(path):
    o = GaussianMixtureFlow.random(dim=2, n_components=4, seed=1, path=path)
    z = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(o, z, solver="dpm++3m", steps=400, grid="logsnr", grid_options={"path": path},
                 path=path).x
    for solver in NEW:
        spec = get_solver(solver)
        errs = []
        for nfe in (12, 48):
            x = sample(o, z, solver=solver, steps=spec.steps_for_nfe(nfe), path=path).x
            assert torch.isfinite(x).all()
            errs.append(rmse(x, ref))
        assert errs[1] < 0.5 * errs[0], (path, solver, errs)


@pytest.mark.parametrize("solver", ["dpm++2m", "dpm++3m", "dpm++2s", "dpm++3s", "unipc-bh2"])
def test_inversion_round_trip(oracle, noise, solver):
    x1 = sample(oracle, noise, solver="rk4", steps=256).x
    errs = []
    for steps in (8, 32):
        zz = invert(oracle, x1, solver=solver, steps=steps).x
        assert torch.isfinite(zz).all()
        errs.append(rmse(sample(oracle, zz, solver=solver, steps=steps).x, x1))
    assert errs[1] < 0.25 * errs[0], errs


def test_unipc_trajectory_holds_the_corrected_states(oracle, noise):
    res = sample(oracle, noise[:8], solver="unipc", steps=5, return_trajectory=True)
    assert res.trajectory.shape == (6, 8, 2) and res.nfe == 5
    assert torch.equal(res.trajectory[0], noise[:8]) and torch.equal(res.trajectory[-1], res.x)
    plain = sample(oracle, noise[:8], solver="unipc", steps=5, corrector=False)
    assert not torch.allclose(plain.x, res.x)


def test_bad_options(oracle, noise):
    with pytest.raises(ValueError, match="order"):
        sample(oracle, noise, solver="unipc", steps=4, order=4)
    with pytest.raises(ValueError, match="variant"):
        sample(oracle, noise, solver="unipc", steps=4, variant="bh3")
    with pytest.raises(ValueError, match="r1"):
        sample(oracle, noise, solver="dpm++2s", steps=4, r1=0.0)
