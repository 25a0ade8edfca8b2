"""Multistep, momentum, pseudo-corrector, adaptive and SDE solvers, pinned on the exact oracle field.

Empirical orders are measured in float64 on the 8-component 2D oracle over t in [0.25, 0.75]
(uniform grid) against dopri5 at rtol = atol = 1e-12. The interval avoids the last stretch
before t = 1, where the mixture's components sharpen and the velocity's high derivatives are
large: there AB4/PLMS need > 100 steps before the slope settles at 4 (3.6-3.9 at 64-128 steps
over [0, 1]); on [0.25, 0.75] every method shows its order from 16 steps on.
"""
import math

import numpy as np
import pytest
import torch

import straightflow.solvers.adaptive  # noqa: F401  (registers dopri5)
import straightflow.solvers.multistep  # noqa: F401  (registers ab2-4, plms, hb, ghvb, heun_pc)
import straightflow.solvers.sde  # noqa: F401  (registers sde)
from straightflow.metrics import sliced_w2
from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import available, get_solver, invert, sample, solve
from straightflow.solvers.multistep import ab_coefficients, exact_nfe, steps_for_nfe

T0, T1 = 0.25, 0.75


@pytest.fixture(scope="module")
def oracle8():
    """The 8-component 2D oracle of this module (the session-wide ``oracle`` of conftest has 4)."""
    return GaussianMixtureFlow.random(dim=2, n_components=8, seed=0)


@pytest.fixture(scope="module")
def reference(oracle8, noise):
    return sample(oracle8, noise, solver="dopri5", steps=1, rtol=1e-12, atol=1e-12, t0=T0, t1=T1).x


def _err(oracle8, noise, ref, solver, steps=None, grid="uniform", **kw):
    x = sample(oracle8, noise, solver=solver, steps=steps, grid=grid, t0=T0, t1=T1, **kw).x
    return (x - ref).pow(2).mean().sqrt().item()


def _slopes(errs):
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


def _alternating(n):
    """Steps alternating h, 2h: step ratios jump by 2 everywhere."""
    w = torch.tensor([1.0 if i % 2 == 0 else 2.0 for i in range(n)], dtype=torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), w.cumsum(0)])
    return T0 + (T1 - T0) * c / c[-1]


# ----------------------------------------------------------------------------- coefficients

def test_ab_coefficients_uniform_and_variable():
    for k, ref in [(1, [1]), (2, [3, -1]), (3, [23, -16, 5]), (4, [55, -59, 37, -9])]:
        den = {1: 1, 2: 2, 3: 12, 4: 24}[k]
        b = ab_coefficients([-float(j) for j in range(k)], 1.0)
        assert np.allclose(b, [r / den for r in ref], atol=1e-14)
    # variable steps: exact for polynomials of degree k-1
    times, t_next = [0.5, 0.41, 0.37, 0.2], 0.63
    b = ab_coefficients(times, t_next)
    h = t_next - times[0]
    for d in range(4):
        exact = (t_next ** (d + 1) - times[0] ** (d + 1)) / (d + 1)
        assert abs(h * sum(bj * tj**d for bj, tj in zip(b, times)) - exact) < 1e-14
    # decreasing times (inversion) give the same weights as the mirrored increasing ones
    assert np.allclose(ab_coefficients([0.5, 0.6, 0.8], 0.3), ab_coefficients([0.5, 0.4, 0.2], 0.7))


# ----------------------------------------------------------------------------- orders

@pytest.mark.parametrize("solver,order,kw", [
    ("ab2", 2, {}), ("ab3", 3, {}), ("ab4", 4, {}), ("ab4", 4, {"warmup": "rk4"}), ("plms", 4, {}),
    ("heun_pc", 2, {}), ("heun_pc", 2, {"exact_steps": 3}),
])
def test_empirical_order_uniform_grid(oracle8, noise, reference, solver, order, kw):
    errs = [_err(oracle8, noise, reference, solver, n, **kw) for n in (16, 32, 64)]
    slopes = _slopes(errs)
    assert errs[0] > errs[1] > errs[2]
    assert abs(slopes[-1] - order) < 0.3, (solver, errs, slopes)
    assert get_solver(solver).order == order


@pytest.mark.parametrize("solver,order", [("ab2", 2), ("ab3", 3), ("ab4", 4), ("plms", 4)])
def test_variable_step_coefficients_keep_the_order(oracle8, noise, reference, solver, order):
    errs = [_err(oracle8, noise, reference, solver, grid=_alternating(n)) for n in (16, 32, 64)]
    assert abs(_slopes(errs)[-1] - order) < 0.3, (solver, errs)


@pytest.mark.parametrize("solver,kw", [
    ("hb", {}), ("hb", {"beta": 0.5, "order": 4}), ("ghvb", {}), ("ghvb", {"order": 2.5}), ("ghvb", {"order": 0.6}),
])
def test_momentum_methods_converge(oracle8, noise, reference, solver, kw):
    errs = [_err(oracle8, noise, reference, solver, n, **kw) for n in (16, 32, 64)]
    slopes = _slopes(errs)
    assert errs[0] > errs[1] > errs[2]
    assert min(slopes) > 0.85, (solver, kw, errs, slopes)


def test_momentum_special_cases_reduce_to_known_methods(oracle8, noise):
    run = lambda s, **kw: sample(oracle8, noise, solver=s, steps=12, **kw).x  # noqa: E731
    assert torch.allclose(run("hb", beta=1.0), run("euler"), atol=1e-13)
    assert torch.allclose(run("ghvb", order=1), run("euler"), atol=1e-13)
    # the paper: Euler with HB beta is GHVB of momentum number beta; integer orders are PLMS
    assert torch.allclose(run("ghvb", order=0.8), run("hb", beta=0.8), atol=1e-13)
    assert torch.allclose(run("ghvb", order=2), run("ab2"), atol=1e-12)
    assert torch.allclose(run("hb", beta=1.0, order=2), run("ab2"), atol=1e-12)
    with pytest.raises(ValueError, match="beta"):
        run("hb", beta=0.0)
    with pytest.raises(ValueError, match="momentum number"):
        run("ghvb", order=5.5)


# ----------------------------------------------------------------------------- NFE

@pytest.mark.parametrize("solver,kw", [
    ("ab2", {}), ("ab3", {}), ("ab4", {}), ("ab3", {"warmup": "rk4"}), ("plms", {}), ("pndm", {}),
    ("hb", {}), ("ghvb", {"order": 3.5}), ("heun_pc", {}), ("flowturbo", {"exact_steps": 2}),
])
def test_exact_nfe_is_counted_from_real_calls(oracle8, noise, solver, kw):
    for steps in range(1, 9):
        oracle8.reset_nfe()
        res = sample(oracle8, noise[:8], solver=solver, steps=steps, **kw)
        assert res.nfe == oracle8.nfe == exact_nfe(solver, steps, **kw), (solver, steps)


def test_nfe_accounting_formulas():
    for n in range(4, 12):
        assert exact_nfe("ab2", n) == n                      # Euler start, then 1 per step
        assert exact_nfe("ab3", n) == n + 1                  # one Heun step
        assert exact_nfe("ab4", n) == n + 4                  # two RK3 steps
        assert exact_nfe("plms", n) == 4 * 3 + (n - 3)       # PNDM: three RK4 steps
        assert exact_nfe("heun_pc", n) == n + 1
        assert exact_nfe("hb", n) == exact_nfe("ghvb", n) == n
    assert [exact_nfe("pndm", n) for n in (1, 2, 3)] == [4, 8, 12]
    assert exact_nfe("heun", 5, final_euler=True) == 9 and exact_nfe("rk4", 3) == 12
    assert steps_for_nfe("plms", 20) == 11 and steps_for_nfe("plms", 10) == 2
    assert steps_for_nfe("heun_pc", 10) == 9 and steps_for_nfe("ab3", 10) == 9
    with pytest.raises(ValueError, match="warmup"):
        exact_nfe("ab3", 4, warmup="euler")


def test_multistep_inversion_round_trip(oracle8, noise):
    x1 = sample(oracle8, noise, solver="rk4", steps=200).x
    for solver in ("ab3", "plms", "heun_pc", "ghvb"):
        errs = []
        for steps in (32, 64):
            z = invert(oracle8, x1, solver=solver, steps=steps).x
            errs.append((sample(oracle8, z, solver=solver, steps=steps).x - x1).pow(2).mean().sqrt().item())
        assert errs[1] < errs[0] < 0.02, (solver, errs)


# ----------------------------------------------------------------------------- dopri5

@pytest.mark.slow
def test_dopri5_matches_fine_rk4(oracle8, noise):
    x0 = noise[:32]
    rk = solve(oracle8, x0, torch.linspace(0, 1, 4097, dtype=torch.float64), "rk4", check_finite=False).x
    oracle8.reset_nfe()
    res = sample(oracle8, x0, solver="dopri5", steps=1, rtol=1e-10, atol=1e-10)
    assert (res.x - rk).abs().max().item() < 1e-8
    assert res.nfe == oracle8.nfe and res.nfe % 6 == 2  # 6 per step, + first stage + starting-step probe


def test_dopri5_nfe_falls_as_tolerance_loosens(oracle8, noise):
    ref = sample(oracle8, noise, solver="dopri5", steps=1, rtol=1e-12, atol=1e-12).x
    nfes, errs = [], []
    for tol in (1e-10, 1e-7, 1e-4):
        res = sample(oracle8, noise, solver="dopri5", steps=1, rtol=tol, atol=tol)
        nfes.append(res.nfe)
        errs.append((res.x - ref).abs().max().item())
    assert nfes[0] > nfes[1] > nfes[2], nfes
    assert errs[0] < errs[1] < errs[2] and errs[0] < 1e-8 and errs[2] < 1e-2, errs


def test_dopri5_grid_times_callback_and_inversion(oracle8, noise):
    tight = dict(rtol=1e-10, atol=1e-10)
    res = sample(oracle8, noise, solver="dopri5", grid="shifted", steps=6, return_trajectory=True, **tight)
    assert res.trajectory.shape == (7, 256, 2)
    # every reported state is the solution at its grid time
    for i in (2, 4):
        part = sample(oracle8, noise, solver="dopri5", grid=res.times[: i + 1], steps=None, **tight).x
        assert (res.trajectory[i] - part).abs().max() < 1e-8
    through = sample(oracle8, noise, solver="dopri5", steps=6, hit_grid=False, return_trajectory=True, **tight)
    assert through.trajectory.shape == (2, 256, 2) and (through.x - res.x).abs().max() < 1e-8
    z = invert(oracle8, res.x, solver="dopri5", steps=1, **tight).x
    assert (z - noise).abs().max() < 1e-8
    with pytest.raises(RuntimeError, match="max_steps"):
        sample(oracle8, noise, solver="dopri5", steps=1, rtol=1e-12, atol=1e-12, max_steps=5)
    with pytest.raises(ValueError, match="rtol"):
        sample(oracle8, noise, solver="dopri5", steps=1, rtol=0.0)


# ----------------------------------------------------------------------------- SDE

_CHUNK, _N_CHUNKS = 500, 16


def _moment_z(x, oracle8):
    """Standardised errors of the sample mean and covariance against the oracle's exact moments."""
    n = x.shape[0]
    m, c = x.mean(0), torch.cov(x.T)
    xc = x - m
    se_m = (c.diag() / n).sqrt()
    se_c = ((xc[:, :, None] * xc[:, None, :]).var(0) / n).sqrt()
    return ((m - oracle8.mean()) / se_m).abs().max().item(), ((c - oracle8.covariance()) / se_c).abs().max().item()


def _sw2_ratio(x, oracle8, seed=5):
    """Mean sliced W2 of 16 chunks of 500 samples to fresh exact samples, over the same for data vs data.

    For exact samples this ratio is 1.00 +- 0.08 (measured over 100 repetitions; max 1.23), so
    1.5 is a > 5 sd margin, while a single 500-vs-500 comparison scatters by +-40%.
    """
    g = torch.Generator().manual_seed(seed)
    n = _CHUNK * _N_CHUNKS
    a = oracle8.sample(n, generator=g, dtype=torch.float64).split(_CHUNK)
    b = oracle8.sample(n, generator=g, dtype=torch.float64).split(_CHUNK)
    val = np.mean([sliced_w2(xi, ai, n_projections=64, seed=j) for j, (xi, ai) in enumerate(zip(x.split(_CHUNK), a))])
    floor = np.mean([sliced_w2(bi, ai, n_projections=64, seed=j) for j, (bi, ai) in enumerate(zip(b, a))])
    return val / floor


@pytest.mark.slow
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_keeps_the_marginals(path):
    o = GaussianMixtureFlow.random(dim=2, n_components=8, seed=0, path=path)
    z = torch.randn(_CHUNK * _N_CHUNKS, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = sample(o, z, solver="sde", steps=500, path=path, seed=7).x
    x_ode = sample(o, z, solver="rk4", steps=8).x  # the deterministic image of the same noise
    assert (x - x_ode).norm(dim=1).median() > 0.1  # noise was injected: samples left their ODE paths
    assert _sw2_ratio(x, o) < 1.5
    zm, zc = _moment_z(x, o)
    assert zm < 4.5 and zc < 4.5, (zm, zc)


def test_sde_moment_check_detects_a_wrong_score():
    # negative control: a linear-path model sampled as if it were cosine gets the wrong score
    o = GaussianMixtureFlow.random(dim=2, n_components=8, seed=0, path="linear")
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = sample(o, z, solver="sde", steps=100, path="cosine", g=1.0, seed=7).x
    assert max(_moment_z(x, o)) > 10


def test_sde_seeding_options_and_errors(oracle8, noise):
    run = lambda **kw: sample(oracle8, noise, solver="sde", steps=20, **kw).x  # noqa: E731
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(run(generator=g1), run(generator=g2))
    assert get_solver("euler_maruyama").name == "sde" and get_solver("sde").stochastic
    # g = 0 is the Euler ODE sampler; a callable, a float and a named schedule agree when equal
    assert torch.allclose(run(g=0.0, seed=1), sample(oracle8, noise, solver="euler", steps=20).x, atol=1e-13)
    assert torch.equal(run(g=0.7, seed=2), run(g=lambda t: 0.7, seed=2))
    assert torch.equal(run(g="constant", scale=0.7, seed=2), run(g=0.7, seed=2))
    # on the linear path the denoising last step is the Euler step
    assert torch.allclose(run(seed=2, last_step="denoise"), run(seed=2), atol=1e-12)
    for g in ("sigma", "decreasing", "sin"):
        assert torch.isfinite(run(g=g, seed=1, last_step="sde")).all()
    with pytest.raises(ValueError, match="diffusion schedule"):
        run(g="wobbly")
    with pytest.raises(ValueError, match="last_step"):
        run(last_step="tweedie")
    with pytest.raises(ValueError, match="invert"):
        solve(oracle8, noise, torch.linspace(1, 0, 5, dtype=torch.float64), "sde")
    with pytest.raises(ValueError, match="stochastic"):
        invert(oracle8, noise, solver="sde")


def test_registry_lists_new_solvers():
    names = set(available())
    assert {"ab2", "ab3", "ab4", "plms", "hb", "ghvb", "heun_pc", "dopri5", "sde"} <= names
    assert get_solver("pndm").name == "plms" and get_solver("flowturbo").name == "heun_pc"
    assert get_solver("euler_maruyama").needs_path
