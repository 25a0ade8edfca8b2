"""Optimised schedules: BOSS grids, the Bellman DP, per-step solver search, cached calibrations."""
import itertools
import json
import math

import pytest
import torch

import straightflow as sf
from straightflow.grids import validate_grid
from straightflow.oracle import GaussianMixtureFlow
from straightflow.optimize import (
    Calibration, bellman_path, boss_cost_table, boss_grid, calibrate, calibrated_grid, calibrated_schedule,
    calibration_path, load_calibration, model_fingerprint, reference_trajectory, run_schedule, save_calibration,
    search_schedule,
)
from straightflow.solvers import get_solver, solve

FINE = 256


@pytest.fixture(scope="module")
def setup():
    m = GaussianMixtureFlow.random(dim=2, n_components=8, seed=0)
    g = torch.Generator().manual_seed(0)
    xc = torch.randn(256, 2, generator=g, dtype=torch.float64)
    xh = torch.randn(512, 2, generator=g, dtype=torch.float64)
    ref = reference_trajectory(m, xc, FINE)
    href = solve(m, xh, torch.linspace(0, 1, FINE + 1, dtype=torch.float64), "rk4").x
    return m, xc, xh, ref, href


def _rmse(a, b):
    return float(((a - b) ** 2).mean().sqrt())


# ---------------------------------------------------------------- the dynamic programme
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bellman_path_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    M = 8
    C = torch.rand(M, M, generator=g, dtype=torch.float64)
    for steps in range(1, M):
        best, best_path = math.inf, None
        for inner in itertools.combinations(range(1, M - 1), steps - 1):
            nodes = (0,) + inner + (M - 1,)
            c = sum(float(C[a, b]) for a, b in zip(nodes[:-1], nodes[1:]))
            if c < best:
                best, best_path = c, list(nodes)
        path, cost = bellman_path(C, steps)
        assert path == best_path and cost == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError):
        bellman_path(C, M)


def test_reference_velocities_are_free_and_exact(setup):
    m, xc, _, ref, _ = setup
    assert ref.nfe == 4 * FINE + 1 and ref.xs.shape == (FINE + 1, 256, 2)
    i = 37
    assert torch.allclose(ref.vs[i], m(ref.xs[i], torch.full((256,), float(ref.times[i]), dtype=torch.float64)))
    # Hermite interpolation between fine points agrees with the exact solution
    t = 0.5 * float(ref.times[i] + ref.times[i + 1])
    exact = solve(m, ref.xs[i], torch.tensor([float(ref.times[i]), t], dtype=torch.float64), "rk4").x
    assert _rmse(ref.at(t), exact) < 1e-7


# ---------------------------------------------------------------- BOSS
@pytest.mark.parametrize("solver,nfe", [("euler", 4), ("euler", 7), ("midpoint", 6), ("heun", 5)])
def test_boss_grid_is_valid(setup, solver, nfe):
    m, xc, _, ref, _ = setup
    g = boss_grid(m, xc, nfe, solver, reference=ref, n_candidates=None if solver == "euler" else 16)
    steps = get_solver(solver).steps_for_nfe(nfe)
    assert g.dtype == torch.float64 and g.shape == (steps + 1,)
    assert float(g[0]) == 0.0 and float(g[-1]) == 1.0 and bool((g[1:] > g[:-1]).all())
    validate_grid(g, direction=1)
    out = sf.sample(m, xc[:8], solver=solver, grid=g)  # an explicit grid: steps come from it
    assert out.nfe == get_solver(solver).nfe(steps)


def test_boss_euler_beats_uniform_on_holdout(setup):
    m, xc, xh, ref, href = setup
    for nfe in (4, 6, 8):
        g = boss_grid(m, xc, nfe, "euler", reference=ref)
        boss = _rmse(sf.sample(m, xh, solver="euler", grid=g).x, href)
        unif = _rmse(sf.sample(m, xh, solver="euler", steps=nfe).x, href)
        assert boss < unif, (nfe, boss, unif)


def test_boss_euler_costs_only_the_reference():
    m = GaussianMixtureFlow.random(dim=2, n_components=4, seed=1)
    m.reset_nfe()
    g, info = boss_grid(m, (64, 2), 5, "euler", fine_steps=64, return_info=True)
    assert m.nfe == 4 * 64 + 1 == info["calibration_nfe"] and info["table_calls"] == 0
    assert g.numel() == 6


def test_boss_table_batched_pairs_match_single_steps(setup):
    m, _, _, ref, _ = setup
    C, idx, calls = boss_cost_table(m, ref, "heun", n_candidates=6)
    assert idx == torch.linspace(0, FINE, 7, dtype=torch.float64).round().long().tolist()
    assert calls == 2 + 2  # all pairs stacked in one batch (one call per Heun stage) + a one-pair check
    for a, b in [(0, 1), (1, 4), (0, len(idx) - 1), (3, 5)]:
        ta, tb = float(ref.times[idx[a]]), float(ref.times[idx[b]])
        x = solve(m, ref.xs[idx[a]], torch.tensor([ta, tb], dtype=torch.float64), "heun").x
        assert float(C[a, b]) == pytest.approx(float(((x - ref.xs[idx[b]]) ** 2).mean()), rel=1e-9, abs=1e-15)
    assert math.isinf(float(C[2, 1])) and math.isinf(float(C[3, 3]))


# ---------------------------------------------------------------- schedules and search
def test_run_schedule_counts_and_matches_solve(setup):
    m, xc, _, _, _ = setup
    g = torch.linspace(0, 1, 5, dtype=torch.float64)
    a = run_schedule(m, xc, g, "midpoint")
    b = solve(m, xc, g, "midpoint")
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe == 8
    r = run_schedule(m, xc, g, ["euler", "heun", "heun", "rk4"], return_trajectory=True)
    assert r.nfe == 1 + 2 + 2 + 4 and r.trajectory.shape == (5, 256, 2)
    with pytest.raises(ValueError):
        run_schedule(m, xc, g, ["euler"] * 3)


@pytest.mark.parametrize("nfe", [4, 5])
def test_search_respects_budget_and_beats_single_solvers(setup, nfe):
    m, xc, xh, ref, _ = setup
    cands, grids = ("euler", "midpoint", "heun"), ("uniform", "boss")
    s = search_schedule(m, xc, nfe, candidates=cands, grids=grids, holdout=xh, reference=ref, beam=2, rescore=2)
    assert len(s.solvers) == s.times.numel() - 1 and set(s.solvers) <= set(cands)
    m.reset_nfe()
    out = s.run(m, xh)
    assert out.nfe == m.nfe == s.nfe <= nfe  # counted calls, not declared costs
    assert s.holdout_rmse == pytest.approx(_rmse(out.x, solve(m, xh, torch.linspace(0, 1, FINE + 1,
                                                                                     dtype=torch.float64), "rk4").x))
    # at least as good as every single-solver candidate (each solver alone, on each grid) on the
    # calibration batch; "boss" is the Euler-cost BOSS grid at the solver's step count
    C, idx, _ = boss_cost_table(m, ref, "euler")
    for solver in cands:
        steps = get_solver(solver).steps_for_nfe(nfe)
        nodes, _ = bellman_path(C, steps)
        for grid in (torch.linspace(0, 1, steps + 1, dtype=torch.float64), ref.times[[idx[k] for k in nodes]]):
            single = _rmse(sf.sample(m, xc, solver=solver, grid=grid).x, ref.end)
            assert s.calib_rmse <= single + 1e-12, (solver, single, s.calib_rmse)
    assert s.calib_rmse <= s.best_single["calib_rmse"]


# ---------------------------------------------------------------- calibrations on disk
def test_calibration_round_trip(tmp_path):
    cal = Calibration(kind="boss", solver="euler", nfe=4, times=[0.0, 0.1, 0.35, 0.7, 1.0], solvers=["euler"] * 4,
                      grid="boss", calib_rmse=0.1, holdout_rmse=0.12, reference={"solver": "rk4", "fine_steps": 256},
                      fingerprint="sha256:abc", created="2025-01-01T00:00:00+00:00")
    p = save_calibration(tmp_path, cal)
    assert p == tmp_path / "calibrations" / "boss-euler-nfe4.json" == calibration_path(tmp_path, "boss", "euler", 4)
    assert json.loads(p.read_text())["times"] == cal.times
    back = load_calibration(tmp_path, "boss", "euler", 4, fingerprint="sha256:abc")
    assert back == cal and torch.equal(back.grid_tensor, torch.tensor(cal.times, dtype=torch.float64))
    assert load_calibration(tmp_path, "boss", "euler", 4, fingerprint="sha256:other") is None
    assert load_calibration(tmp_path, "boss", "euler", 4) is None  # nothing to verify against: not reused
    assert load_calibration(tmp_path, "boss", "euler", 6, fingerprint="sha256:abc") is None
    p.write_text("{ truncated")
    with pytest.warns(UserWarning):
        assert load_calibration(tmp_path, "boss", "euler", 4, fingerprint="sha256:abc") is None


def test_calibrated_grid_is_reused_without_model_calls(tmp_path):
    m = GaussianMixtureFlow.random(dim=2, n_components=4, seed=3)
    kw = dict(run_dir=tmp_path, fine_steps=64, batch=64)
    m.reset_nfe()
    g1 = calibrated_grid(m, "euler", 4, **kw)
    assert m.nfe > 0
    cal = load_calibration(tmp_path, "boss", "euler", 4, model=m)
    assert cal is not None and cal.fingerprint == model_fingerprint(m) and cal.reference["fine_steps"] == 64
    assert cal.calib_rmse is not None and cal.holdout_rmse is not None and cal.solvers == ["euler"] * 4
    m.reset_nfe()
    g2 = calibrated_grid(m, "euler", 4, **kw)
    assert m.nfe == 0 and torch.equal(g1, g2)
    # a searched schedule is cached the same way
    s1 = calibrated_schedule(m, 4, ("euler", "midpoint"), grids=("uniform",), beam=2, **kw)
    m.reset_nfe()
    s2 = calibrated_schedule(m, 4, ("euler", "midpoint"), grids=("uniform",), beam=2, **kw)
    assert m.nfe == 0 and s1 == s2
    assert (tmp_path / "calibrations" / "search-euler+midpoint-nfe4.json").is_file()


def test_fingerprint_mismatch_recomputes(tmp_path):
    a = GaussianMixtureFlow.random(dim=2, n_components=4, seed=3)
    b = GaussianMixtureFlow.random(dim=2, n_components=4, seed=4)
    kw = dict(run_dir=tmp_path, fine_steps=32, batch=32)
    calibrated_grid(a, "euler", 3, **kw)
    assert load_calibration(tmp_path, "boss", "euler", 3, model=b) is None
    b.reset_nfe()
    calibrated_grid(b, "euler", 3, **kw)
    assert b.nfe > 0
    assert load_calibration(tmp_path, "boss", "euler", 3, model=b).fingerprint == model_fingerprint(b)


def test_run_dir_fingerprint_and_retrained_weights(tmp_path):
    from straightflow.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "time_dim": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    run = sf.save_model(tmp_path / "run", model)
    assert model_fingerprint(run) == model_fingerprint(model)
    g1 = calibrated_grid(run, "euler", 3, fine_steps=16, batch=16)  # shape from the model's sample_shape
    cal = load_calibration(run, "boss", "euler", 3)
    assert cal is not None and torch.equal(cal.grid_tensor, g1)
    assert calibrate(run, "boss", "euler", 3).created == cal.created  # reused
    with torch.no_grad():
        model.out.bias.add_(1.0)
    sf.save_model(run, model)  # retrained weights
    assert load_calibration(run, "boss", "euler", 3) is None
    calibrated_grid(run, "euler", 3, fine_steps=16, batch=16)
    assert load_calibration(run, "boss", "euler", 3).fingerprint == model_fingerprint(model)
