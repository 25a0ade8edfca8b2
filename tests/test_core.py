"""Time distributions, grids, losses, couplings and the Flow objective, pinned to closed forms."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import straightflow.time as T
from straightflow.coupling import MinibatchOT, PairDataset, get_coupling
from straightflow.flow import Flow
from straightflow.grids import GridError, make_grid, validate_grid
from straightflow.losses import MSE, PseudoHuber, get_loss
from straightflow.registry import UnknownNameError


@pytest.mark.parametrize("name", T.available())
def test_time_samples_match_density(name):
    dist = T.get_time_dist(name)
    g = torch.Generator().manual_seed(0)
    t = dist.sample(40000, generator=g, dtype=torch.float64)
    assert t.min() >= 0 and t.max() <= 1
    # CDF from the density by quadrature, then a KS test against the samples
    grid = torch.linspace(1e-6, 1 - 1e-6, 4001, dtype=torch.float64)
    pdf = dist.density(grid)
    cdf = torch.cumulative_trapezoid(pdf, grid, dim=0)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf]) / cdf[-1]
    ks = stats.kstest(t.numpy(), lambda q: np.interp(q, grid.numpy(), cdf.numpy()))
    assert ks.statistic < 0.012, (name, ks)


def test_time_sampling_is_seeded():
    d = T.get_time_dist("logit_normal")
    a = d.sample(10, generator=torch.Generator().manual_seed(3))
    b = d.sample(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_u_shaped_is_u_shaped_and_mode_s0_is_uniform():
    d = T.UShaped(4.0)
    dens = d.density(torch.tensor([0.0, 0.5, 1.0]))
    assert dens[0] > 3.5 * dens[1] and torch.isclose(dens[0], dens[2])
    u = T.ModeSampling(0.0).sample(5, generator=torch.Generator().manual_seed(0))
    v = torch.rand(5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(u, v, atol=1e-6)


def test_shift_formula_and_resolution_shift():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    sig = 1 - t
    assert torch.allclose(T.shift_time(t, s), 1 - s * sig / (1 + (s - 1) * sig))
    assert torch.allclose(T.shift_time(t, 1.0), t)
    assert T.resolution_shift(512, 256) == pytest.approx(2.0)
    assert T.mu_to_shift(math.log(3.0)) == pytest.approx(3.0)


def test_time_bad_input():
    with pytest.raises(UnknownNameError, match="logit_normal"):
        T.get_time_dist("gaussian")
    with pytest.raises(ValueError):
        T.LogitNormal(s=0)
    with pytest.raises(ValueError):
        T.ModeSampling(s=5)


def test_grids_and_validation():
    g = make_grid("uniform", 4)
    assert torch.allclose(g, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    sh = make_grid("shifted", 8, shift=3.0)
    assert sh[0] == 0 and sh[-1] == 1 and (sh[1:] > sh[:-1]).all()
    assert torch.allclose(sh, T.shift_time(make_grid("uniform", 8), 3.0))
    assert torch.allclose(make_grid("shifted", 8, mu=math.log(3.0)), sh)
    for name in ("logsnr", "karras"):
        gg = make_grid(name, 6)
        assert len(gg) == 7 and gg[0] == 0 and gg[-1] == 1 and (gg[1:] > gg[:-1]).all()
    with pytest.raises(GridError, match="monotone"):
        validate_grid([0.0, 0.5, 0.4, 1.0])
    with pytest.raises(GridError, match=r"\[0, 1\]"):
        validate_grid([0.0, 0.5, 1.2])
    with pytest.raises(GridError, match="non-finite"):
        validate_grid([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="steps"):
        make_grid("uniform", 0)
    with pytest.raises(UnknownNameError, match="uniform"):
        make_grid("cosine-ish", 4)
    with pytest.raises(GridError, match="steps"):
        make_grid([0, 0.5, 1.0], steps=3)


def test_losses():
    p, q = torch.zeros(4, 3), torch.ones(4, 3)
    t = torch.full((4,), 0.5)
    assert torch.allclose(MSE()(p, q, t), torch.ones(4))
    ph = PseudoHuber()
    c = 0.00054 * math.sqrt(3)
    assert torch.allclose(ph(p, q, t), torch.full((4,), (math.sqrt(3 + c * c) - c) / math.sqrt(3)))
    # small errors: pseudo-Huber ~ quadratic / (2c); large: ~ linear
    small = ph(p, q * 1e-6, t)
    assert torch.allclose(small, torch.full((4,), (3e-12 / (2 * c)) / math.sqrt(3)), rtol=1e-3)
    w = get_loss("mse", weighting="inv_noise")
    tt = torch.tensor([0.0, 0.999])
    out = w(torch.zeros(2, 1), torch.ones(2, 1), tt)
    assert out[1] > 100 * out[0]
    with pytest.raises(ValueError, match="shape"):
        MSE()(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))


def test_exact_ot_coupling_is_optimal():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g) + 2
    ox0, ox1, idx = MinibatchOT("exact")(x0, x1)
    assert torch.equal(ox1, x1) and torch.equal(idx, torch.arange(7))
    assert sorted(map(tuple, ox0.tolist())) == sorted(map(tuple, x0.tolist()))  # a permutation
    cost = ((ox0 - x1) ** 2).sum()
    import itertools
    best = min(((x0[list(p)] - x1) ** 2).sum() for p in itertools.permutations(range(7)))
    assert torch.isclose(cost, best)


def test_sinkhorn_coupling_is_seeded_and_lowers_cost():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(256, 2, generator=g), torch.randn(256, 2, generator=g) + 1
    c = get_coupling({"name": "ot", "method": "sinkhorn", "reg": 0.05})
    a0, a1, i = c(x0, x1, torch.Generator().manual_seed(1))
    b0, b1, j = c(x0, x1, torch.Generator().manual_seed(1))
    assert torch.equal(a0, b0) and torch.equal(i, j) and torch.equal(a1, x1[i])
    assert ((a0 - a1) ** 2).sum(1).mean() < 0.5 * ((x0 - x1) ** 2).sum(1).mean()


def test_flow_loss_is_zero_for_exact_velocity_of_a_point_mass():
    c = torch.tensor([1.5, -2.0])

    def exact(x, t):  # data = single point c: v = (c - x) / (1 - t)
        return (c - x) / (1 - t[:, None])

    flow = Flow(exact, path="linear", time_dist=T.LogitNormal())
    x1 = c.expand(64, 2).clone()
    assert flow.loss(x1, generator=torch.Generator().manual_seed(0)) < 1e-10
    assert Flow(lambda x, t: torch.zeros_like(x)).loss(x1, generator=torch.Generator().manual_seed(0)) > 0.1


def test_flow_labels_follow_coupling_and_dropout():
    seen = {}

    class M(torch.nn.Module):
        null_class = 10

        def forward(self, x, t, y=None):
            seen["y"] = y
            return torch.zeros_like(x)

    flow = Flow(M(), coupling="ot", cond_dropout=0.5)
    y = torch.arange(8) % 10
    flow.loss(torch.randn(8, 2), cond={"y": y}, generator=torch.Generator().manual_seed(0))
    kept = seen["y"] != 10
    assert torch.equal(seen["y"][kept], y[kept]) and 0 < kept.sum() < 8
    with pytest.raises(ValueError, match="null class"):
        Flow(lambda x, t, y=None: x, cond_dropout=0.1).loss(torch.randn(4, 2), cond={"y": y[:4]})


def test_stored_pairs():
    x0, x1 = torch.randn(10, 2), torch.randn(10, 2)
    pd = PairDataset(x0, x1)
    flow = Flow(lambda x, t: torch.zeros_like(x), coupling="pairs")
    with pytest.raises(ValueError, match="x0"):
        flow.loss(x1)
    assert flow.loss(pd.x1, x0=pd.x0) > 0
    with pytest.raises(ValueError, match="NaN"):
        PairDataset(x0, x1 * float("nan"))
