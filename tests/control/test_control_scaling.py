"""Inference-time scaling: SDE / VP conversions on the oracle field, exact budgets, search selection."""
import argparse
import math

import pytest
import torch

from straightflow.control import scaling as S
from straightflow.control.rewards import (ClassLogProb, RegionReward, as_reward, parse_reward)
from straightflow.metrics import sliced_w2
from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import sample, solve


class RowCounter:
    """Counts velocity evaluations per batch row, independently of the code under test."""

    def __init__(self, model):
        self.model, self.rows, self.calls = model, 0, 0

    def __call__(self, x, t, **cond):
        self.rows += x.shape[0]
        self.calls += 1
        return self.model(x, t, **cond)


@pytest.fixture(scope="module")
def oracle_vp():
    return GaussianMixtureFlow.random(dim=2, n_components=4, seed=1, path="vp")


# ----------------------------------------------------------------------------- exact formulas
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
def test_score_and_x1_hat_exact_on_oracle(oracle, oracle_vp, t):
    x = 2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tb = torch.full((64,), t, dtype=torch.float64)
    torch.testing.assert_close(S.score(oracle, "linear", x, t), oracle.score(x, tb), rtol=0, atol=1e-10)
    torch.testing.assert_close(S.posterior_x1(oracle, "linear", x, t), oracle.posterior_x1(x, tb), rtol=0, atol=1e-10)
    # linear -> VP conversion: velocity, score and x1_hat of the VP marginals, exactly
    vel, vp_path = S.prepare(oracle, "linear", vp=True)
    torch.testing.assert_close(vel(x, tb), oracle_vp.velocity(x, tb), rtol=0, atol=1e-10)
    torch.testing.assert_close(S.score(vel, vp_path, x, t), oracle_vp.score(x, tb), rtol=0, atol=1e-10)
    torch.testing.assert_close(S.posterior_x1(vel, vp_path, x, t), oracle_vp.posterior_x1(x, tb), rtol=0, atol=1e-10)


def test_vp_grid_matches_snr_and_is_monotone():
    from straightflow.paths import get_path

    g = S.time_grid(10, "linear", vp=True)
    lin = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(get_path("vp").log_snr(g[1:-1]), get_path("linear").log_snr(lin[1:-1]))
    big = S.time_grid(400, "linear", vp=True)  # first times below the VP path's lowest SNR are spread out
    assert big[0] == 0 and big[-1] == 1 and bool((big[1:] > big[:-1]).all())


# ----------------------------------------------------------------------------- marginals
def test_sde_and_vp_conversion_keep_marginals(oracle):
    """SDE (linear and VP, two diffusion scales) and the VP ODE land on the oracle's target: sliced W2
    against exact samples and the covariance error stay at the sampling-noise level (4000 samples,
    60 steps), while noise injected without the score correction visibly inflates the spread."""
    n, steps = 4000, 60
    g = torch.Generator().manual_seed(6)
    ref = oracle.sample(n, g, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    mu, cov = oracle.mean(1.0), oracle.covariance(1.0)

    def check(x, what):
        assert sliced_w2(x, ref) < 0.12, what
        assert float((x.mean(0) - mu).norm()) < 0.15, what
        assert float((torch.cov(x.T) - cov).norm() / cov.norm()) < 0.08, what

    for vp in (False, True):
        for scale in (1.0, 3.0):
            res = S.sde_sample(oracle, noise, steps=steps, vp=vp, scale=scale, generator=torch.Generator().manual_seed(6))
            assert res.nfe == steps
            check(res.x, f"sde vp={vp} scale={scale}")
    vel, _ = S.prepare(oracle, "linear", vp=True)
    check(solve(vel, noise, S.time_grid(steps, "linear", vp=True), "euler").x, "vp ode")
    # the check has teeth: noise injected without the score correction changes the marginals
    x, ts, gn = noise.clone(), torch.linspace(0, 1, steps + 1).tolist(), torch.Generator().manual_seed(1)
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        x = x + h * oracle.velocity(x, ts[i]) + (i < steps - 1) * (1 - ts[i]) * math.sqrt(h) * torch.randn(
            x.shape, generator=gn, dtype=x.dtype)
    assert float((torch.cov(x.T) - cov).norm() / cov.norm()) > 0.1


# ----------------------------------------------------------------------------- budgets
REGION = RegionReward("disc", center=(2.4, 0.0), radius=0.15, temperature=0.05)


@pytest.mark.parametrize("budget", [2, 7, 13, 50, 101])
@pytest.mark.parametrize("vp", [False, True])
def test_smc_and_rbf_never_exceed_budget(budget, vp):
    o = GaussianMixtureFlow.eight_gaussians()
    for method, kw in [("smc", {}), ("rbf", {}), ("rbf", {"init_particles": 1, "steps": 4}),
                       ("best_of_n", {}), ("best_of_n_sde", {})]:
        counter = RowCounter(o)
        n = 5
        res = S.search(counter, REGION, (2,), budget, method, n=n, vp=vp, seed=1, **kw)
        assert counter.rows <= budget * n, (method, counter.rows)
        assert res.nfe == counter.rows // n <= budget
        assert res.x.shape == (n, 2) and res.rewards.shape == (n,)
        if method == "rbf":  # RBF spends the whole budget, exactly
            assert counter.rows == budget * n


def test_rbf_init_particles_count_and_too_small_budget():
    o = GaussianMixtureFlow.eight_gaussians()
    counter = RowCounter(o)
    res = S.rbf(counter, REGION, (2,), 40, n=3, init_particles=8, steps=5)
    assert counter.rows == 40 * 3 and res.info["quota"] == (40 - 8) // 4
    with pytest.raises(ValueError, match="budget"):
        S.rbf(o, REGION, (2,), 8, init_particles=8)
    with pytest.raises(ValueError, match="budget"):
        S.best_of_n(o, REGION, (2,), 3, solver="rk4")


def test_budget_guard_counts_guided_rows():
    o = GaussianMixtureFlow.eight_gaussians()

    class Guided:
        evals_per_call = 2

        def __call__(self, x, t, **c):
            return o(x, t)

    res = S.best_of_n(Guided(), REGION, (2,), 20, n=2, steps=5)
    assert res.info["particles"] == 2 and res.nfe == 20  # 2 rows per evaluation: 2 particles x 5 steps x 2
    f = S._Counted(Guided(), 3)
    with pytest.raises(S.BudgetExceeded):
        f(torch.zeros(2, 2), 0.5)


# ----------------------------------------------------------------------------- selection
def test_best_of_n_picks_the_max_reward_sample():
    o = GaussianMixtureFlow.eight_gaussians()
    res = S.best_of_n(o, REGION, (2,), 60, n=4, steps=6, seed=3)
    cand = res.info["candidate_rewards"]
    assert cand.shape == (4, 10)
    torch.testing.assert_close(res.rewards, cand.max(1).values)
    torch.testing.assert_close(REGION(res.x).double(), res.rewards)
    # the candidates are plain Euler samples of the same noises (row-major per output)
    noise = torch.randn((40, 2), generator=torch.Generator().manual_seed(3))
    plain = sample(o, noise, "euler", steps=6).x
    r_plain = REGION(plain).reshape(4, 10).double()
    torch.testing.assert_close(r_plain, cand)
    torch.testing.assert_close(res.x, plain.reshape(4, 10, 2)[torch.arange(4), cand.argmax(1)])


def test_search_improves_reward_over_plain_sampling():
    o = GaussianMixtureFlow.eight_gaussians()
    base = S.best_of_n(o, REGION, (2,), 10, n=32, steps=10, seed=0)  # N = 1: plain sampling
    for method in ("smc", "rbf"):
        res = S.search(o, REGION, (2,), 200, method, n=32, seed=0)
        assert float(res.rewards.mean()) > float(base.rewards.mean()) + 0.1
    assert S.hit_rate(REGION, S.rbf(o, REGION, (2,), 200, n=32).x) > 0.5


def test_systematic_resampling_and_ess():
    log_w = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [1.0, 1e-9, 1e-9, 1e-9]], dtype=torch.float64))
    idx = S.systematic_resample(log_w, torch.Generator().manual_seed(0))
    counts = torch.stack([torch.bincount(i, minlength=4) for i in idx])
    w = torch.softmax(log_w, -1) * 4
    assert bool(((counts >= w.floor()) & (counts <= w.ceil())).all())
    ess = S.effective_sample_size(torch.zeros(1, 8, dtype=torch.float64))
    torch.testing.assert_close(ess, torch.tensor([8.0], dtype=torch.float64))


def test_diversity():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert S.diversity(x) == pytest.approx(5.0)
    assert S.diversity(x[:1]) == 0.0
    assert S.diversity(x, features=lambda z: 2 * z) == pytest.approx(10.0)


# ----------------------------------------------------------------------------- rewards
def test_rewards():
    disc = parse_reward("region:disc:1,0,0.5:hard")
    x = torch.tensor([[1.0, 0.0], [1.4, 0.0], [2.0, 0.0]])
    assert disc(x).tolist() == [1.0, 1.0, 0.0]
    soft = parse_reward("region:disc:1,0,0.5:soft=0.1")
    torch.testing.assert_close(soft(x), torch.sigmoid(torch.tensor([0.5, 0.1, -0.5]) / 0.1))
    hp = parse_reward("region:halfplane:0,2,1")  # normal normalised to (0, 1): inside where y >= 1
    assert RegionReward("halfplane", normal=(0, 2), offset=1, temperature=None)(
        torch.tensor([[0.0, 1.5], [0.0, 0.5]])).tolist() == [1.0, 0.0]
    assert hp(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.5)
    f = as_reward(lambda z: z[:, :1])
    assert f(x).shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        as_reward(lambda z: z)(x)
    for bad in ("pixel:3", "class:x", "region:square:1,2,3", "region:disc:1,2", "region:disc:0,0,1:wide"):
        with pytest.raises(ValueError):
            parse_reward(bad)


def test_class_reward_is_classifier_log_prob():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    clf.n_classes = 10
    r = ClassLogProb(3, classifier=clf)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(r(x), torch.log_softmax(clf(x), -1)[:, 3])
    torch.testing.assert_close(r(x.reshape(5, 64)), r(x))
    with pytest.raises(ValueError, match="target"):
        ClassLogProb(10, classifier=clf)


def test_unknown_method():
    with pytest.raises(ValueError, match="best_of_n"):
        S.search(GaussianMixtureFlow.eight_gaussians(), REGION, (2,), 10, "beam")


# ----------------------------------------------------------------------------- CLI
def test_search_cli_smoke(tmp_path, capsys):
    from straightflow.cli import control as control_cli

    parser = argparse.ArgumentParser()
    control_cli.register(parser.add_subparsers())
    out = tmp_path / "s.png"
    a = parser.parse_args(["search", "oracle:8gaussians", "--reward", "region:disc:2.4,0,0.15", "--method", "rbf",
                           "--budget", "30", "--n", "8", "--out", str(out), "--vp"])
    assert a.fn(a) == 0
    text = capsys.readouterr().out
    assert "NFE used 30 of budget 30" in text and out.exists() and out.with_suffix(".npz").exists()
    with pytest.raises(ValueError, match="run directory"):
        a = parser.parse_args(["search", str(tmp_path / "nope"), "--reward", "class:3"])
        a.fn(a)


@pytest.mark.slow
def test_bench_scaling_quick(tmp_path):
    from benchmarks.scaling import bench_scaling

    md = bench_scaling(str(tmp_path), quick=True)
    assert "| method" in md and "rbf" in md
    assert (tmp_path / "scaling_reward_vs_budget.png").exists()
