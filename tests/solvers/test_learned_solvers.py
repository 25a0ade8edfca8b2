"""Learned non-stationary solvers (solvers/learned.py), iPNDM, and their fitting (optimize/learned.py).

Asserted: the table of every classical solver reproduces it to rounding (float64 oracle), the
time parametrisation is exact at initialisation, guidance and NFE counting, serialisation,
and that a calibration never returns something worse than its start on held-out noise (with a
forced overfit that must fall back), that the least-squares mode never back-propagates into the
model, and that fitting improves the oracle by a clear factor.
"""
import json
import math

import pytest
import torch

from straightflow.optimize.learned import (DCCompensation, _TimeMap, candidates, fit_dc, fit_ls, reference,
                                          select_initial)
from straightflow.optimize.learned import fit_learned as calibrate
from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import get_solver, sample
from straightflow.solvers.learned import LearnedSolver, sample_learned, symbolic_run

CLASSICAL = ["euler", "heun", "midpoint", "rk4", "ab2", "ab3", "ab4", "plms", "hb", "ghvb", "heun_pc", "dpm++1",
             "dpm++2m", "dpm++3m", "dpm++2s", "dpm++3s", "unipc", "unipc-bh1", "deis", "deis-pc", "ipndm"]


@pytest.fixture(scope="module")
def field8():
    o = GaussianMixtureFlow.random(dim=8, n_components=4, seed=1)
    z = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return o, z


def rmse(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("solver", CLASSICAL)
def test_table_reproduces_the_classical_solver(field8, solver):
    o, z = field8
    for steps, grid in ((3, "uniform"), (5, "logsnr")):
        ls = LearnedSolver.from_solver(solver, steps, grid=grid)
        ref = sample(o, z, solver=solver, steps=steps, grid=grid)
        out = sample_learned(o, z, ls)
        assert out.nfe == ref.nfe == ls.nfe
        assert (out.x - ref.x).abs().max().item() < 1e-10, solver  # rounding (logsnr steps of 1e-3)


def test_table_with_solver_options_and_other_path():
    o = GaussianMixtureFlow.random(dim=3, n_components=3, seed=2, path="cosine")
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for solver, opts in (("unipc", {"order": 3}), ("ipndm", {"order": 3}), ("deis-pc", {"order": 1})):
        ls = LearnedSolver.from_solver(solver, 6, path="cosine", **opts)
        ref = sample(o, z, solver=solver, steps=6, path="cosine", **opts).x
        assert (sample_learned(o, z, ls).x - ref).abs().max().item() < 1e-12, solver


def test_table_shape_count_serialisation_and_errors():
    ls = LearnedSolver.from_solver("dpm++2m", 10)
    assert ls.nfe == 10 and ls.n_params == 76
    back = LearnedSolver.from_dict(json.loads(json.dumps(ls.to_dict())))
    assert back.times == ls.times and back.a == ls.a and back.b == ls.b
    with pytest.raises(ValueError, match="shape"):
        LearnedSolver([0.0, 0.5], [1.0, 1.0], [[], [0.5]])
    with pytest.raises(ValueError, match="non-decreasing"):
        LearnedSolver([0.5, 0.0], [1.0, 1.0, 1.0], [[], [0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="stochastic or adaptive"):
        LearnedSolver.from_solver("dopri5", 4)
    with pytest.raises(ValueError, match="learned"):
        LearnedSolver.from_dict({"kind": "grid"})


def test_time_map_is_exact_at_init_and_keeps_ties():
    for solver in ("heun", "rk4", "unipc", "midpoint"):
        ls = LearnedSolver.from_solver(solver, 4)
        tm = _TimeMap(ls.times)
        got = tm(tm.w0)
        assert (got - torch.tensor(ls.times, dtype=torch.float64)).abs().max().item() < 1e-14
        moved = tm(tm.w0 + torch.linspace(-0.3, 0.3, tm.w0.numel(), dtype=torch.float64))
        assert bool((moved[1:] >= moved[:-1]).all())
        same = [(i, j) for i in range(ls.nfe) for j in range(i) if ls.times[i] == ls.times[j]]
        assert all(moved[i] == moved[j] for i, j in same)


class _Guided:
    """The oracle as a class-conditional model with a null class (negative labels: unconditional)."""

    null_class = -1

    def __init__(self, o):
        self.o = o

    def __call__(self, x, t, y=None):
        return self.o(x, t, y=y)


def test_guidance_is_stored_counted_and_enforced(field8):
    o, z = field8
    m = _Guided(o)
    y = torch.arange(z.shape[0]) % 4
    ls = LearnedSolver.from_solver("unipc", 5, guidance=2.0)
    out = sample_learned(m, z, ls, cond={"y": y})
    ref = sample(m, z, solver="unipc", steps=5, guidance=2.0, cond={"y": y})
    assert out.nfe == ref.nfe == 10 and (out.x - ref.x).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="guidance scale"):
        sample_learned(m, z, ls, cond={"y": y}, guidance=3.0)


def test_ipndm_weights_are_adams_bashforth_with_ab_warmup():
    ls = LearnedSolver.from_solver("ipndm", 5)
    h = 0.2
    assert ls.b[1] == pytest.approx([h])                               # Euler
    assert ls.b[2] == pytest.approx([h - h / 2, 3 * h / 2])             # x1 + h (3 u1 - u0) / 2
    assert ls.b[4][0] == pytest.approx(h * (-9 / 24) + h * (5 / 12) + h * (-1 / 2) + h)  # u0 through the history
    assert ls.nfe == 5 and get_solver("ipndm").nfe(5) == 5
    with pytest.raises(ValueError, match="order"):
        sample(lambda x, t: -x, torch.ones(2, 2), solver="ipndm", steps=4, order=5)


@pytest.fixture(scope="module")
def oracle2d():
    o = GaussianMixtureFlow.random(dim=2, n_components=8, seed=0)
    xc = torch.randn(256, 2, generator=torch.Generator().manual_seed(1000), dtype=torch.float64)
    xh = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return o, xc, xh, (reference(o, xc), reference(o, xh))


def test_select_initial_picks_the_best_candidate(oracle2d):
    o, xc, _, (rc, _) = oracle2d
    init, errs, _ = select_initial(o, xc, rc.at(1.0), 5)
    assert init.nfe == 5 and init.meta["init"] == min(errs, key=errs.get)
    assert {"ipndm3", "unipc", "dpm++2m", "deis-pc"} <= set(errs)
    assert all(ls.nfe == 7 for _, ls in candidates(7))


@pytest.mark.parametrize("mode", ["ls", "grad"])
def test_fit_improves_and_is_never_worse_on_heldout(oracle2d, mode):
    o, xc, xh, refs = oracle2d
    res = calibrate(o, xc, xh, 5, mode=mode, references=refs, grad_iters=8)
    assert res.heldout_rmse["fitted"] < 0.7 * res.heldout_rmse["init"], res.heldout_rmse
    assert not res.fallback and res.solver.nfe == 5
    got = rmse(sample_learned(o, xh, res.solver).x, refs[1].at(1.0))
    assert got == pytest.approx(res.heldout_rmse["fitted"], rel=1e-9)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["meta"]["fingerprint"].startswith("sha256:") and d["solver"]["kind"] == "learned"


@pytest.mark.parametrize("mode", ["grad", "ls"])
def test_a_worse_fit_falls_back_to_the_initial_solver(oracle2d, mode):
    """Calibrated against the reference of another field (a fit that cannot transfer), the table is
    worse on the held-out batch, and the calibration returns the initial table unchanged."""
    o, xc, xh, (_, rh) = oracle2d
    other = GaussianMixtureFlow.random(dim=2, n_components=8, seed=3)
    init = LearnedSolver.from_solver("unipc", 6)
    res = calibrate(o, xc, xh, 6, mode=mode, init=init, references=(reference(other, xc), rh), grad_iters=5)
    assert res.heldout_rmse["fitted"] >= res.heldout_rmse["init"] and res.fallback
    assert res.solver.times == res.initial.times and res.solver.b == res.initial.b
    got = rmse(sample_learned(o, xh, res.solver).x, rh.at(1.0))
    assert got == pytest.approx(res.heldout_rmse["init"], rel=1e-9)


def test_least_squares_mode_never_backpropagates(oracle2d):
    o, xc, _, (rc, _) = oracle2d

    def model(x, t):
        assert not torch.is_grad_enabled() and not x.requires_grad
        return o(x, t)

    init = LearnedSolver.from_solver("unipc", 4)
    rc.extend(o, init.times)
    fitted, st = fit_ls(model, xc, rc, init)
    assert st["calls"] == 4
    assert rmse(sample_learned(o, xc, fitted).x, rc.at(1.0)) < rmse(sample_learned(o, xc, init).x, rc.at(1.0))


def test_dc_compensation_identity_and_fit(oracle2d):
    o, xc, _, (rc, _) = oracle2d
    g = torch.linspace(0, 1, 7, dtype=torch.float64)
    plain = symbolic_run("unipc", g)
    same = symbolic_run("unipc", g, wrap=DCCompensation({3: 1.0, 4: 1.0}))
    assert same.rows == plain.rows and same.out == plain.out
    moved = symbolic_run("unipc", g, wrap=DCCompensation({3: 0.8}))
    assert moved.rows[:4] == plain.rows[:4] and moved.out != plain.out
    fitted, st = fit_dc(o, xc, rc, "unipc", 6, ref_velocity=o)
    before = rmse(sample_learned(o, xc, LearnedSolver.from_run(plain)).x, rc.at(1.0))
    assert rmse(sample_learned(o, xc, fitted).x, rc.at(1.0)) <= before * (1 + 1e-12)
    assert set(st["ratios"]) <= set(range(2, 6)) and all(0.0 <= r <= 2.0 for r in st["ratios"].values())


def test_calibrate_rejects_bad_input(oracle2d):
    o, xc, xh, refs = oracle2d
    with pytest.raises(ValueError, match="mode"):
        calibrate(o, xc, xh, 4, mode="magic", references=refs)
    with pytest.raises(ValueError, match="shape"):
        calibrate(o, xc, torch.zeros(4, 3, dtype=torch.float64), 4, references=refs)
    with pytest.raises(ValueError, match="nfe"):
        candidates(0)
    assert math.isfinite(refs[0].calls)


def test_reference_merges_times_that_coincide_to_rounding(oracle2d):
    o, xc, _, _ = oracle2d
    t = 1.0 / 3.0
    r = reference(o, xc[:8], [t, t * (1 + 1e-15), 0.5])  # a dopri5 stop 5e-17 apart would underflow
    assert torch.equal(r.at(t), r.at(t * (1 + 1e-15))) and len(r.states) == 3
    with pytest.raises(KeyError):
        r.at(0.25)


def test_calibration_with_conditioning_and_guidance(oracle2d):
    """A class-conditional field under classifier-free guidance 2: references, fit and table all use
    the guided field with the labels; the table stores the scale and counts guided rows twice."""
    o, xc, xh, _ = oracle2d
    m = _Guided(o)
    yc, yh = {"y": torch.arange(xc.shape[0]) % 8}, {"y": torch.arange(xh.shape[0]) % 8}
    res = calibrate(m, xc, xh, 4, mode="ls", cond=yc, heldout_cond=yh, guidance=2.0)
    assert res.solver.guidance == 2.0 and res.meta["guidance"] == 2.0
    ref = sample(m, xh, solver="dopri5", steps=1, guidance=2.0, cond=yh, rtol=1e-8, atol=1e-8).x
    out = sample_learned(m, xh, res.solver, cond=yh)
    assert out.nfe == 8 and rmse(out.x, ref) == pytest.approx(min(res.heldout_rmse.values()), rel=1e-5)
