"""Tests of the exact Gaussian-mixture flow (straightflow.oracle)."""
from __future__ import annotations

import math

import pytest
import torch

from straightflow.oracle import GaussianMixtureFlow
from straightflow.paths import convert_velocity, get_path

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are many small tensor ops: one thread avoids oversubscription on busy CI."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rk4(model, x, n_steps=200, t0=0.0, t1=1.0, warp=False):
    """Fixed-step classical RK4 for dx/dt = model(x, t). ``warp`` uses t = 1 - (1 - u)^2 on a
    uniform u grid (steps shrink near t = 1, where the VP path's sigma' has a sqrt singularity)."""
    u = torch.linspace(t0, t1, n_steps + 1, dtype=torch.float64)
    ts = (1 - (1 - u) ** 2) if warp else u
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    for i in range(n_steps):
        t, h = float(ts[i]), float(ts[i + 1] - ts[i])
        k1 = model(x, t * ones)
        k2 = model(x + 0.5 * h * k1, (t + 0.5 * h) * ones)
        k3 = model(x + 0.5 * h * k2, (t + 0.5 * h) * ones)
        k4 = model(x + h * k3, (t + h) * ones)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _moment_tolerances(samples, z=5.0):
    """Monte-Carlo standard errors (times z) of the sample mean and sample covariance."""
    n = samples.shape[0]
    c = samples - samples.mean(0)
    se_mean = c.std(0) / math.sqrt(n)
    prod = c[:, :, None] * c[:, None, :]
    se_cov = prod.std(0) / math.sqrt(n)
    return z * se_mean, z * se_cov


# ---------------------------------------------------------------------------- score / density
@pytest.mark.parametrize("path", ["linear", "cosine", "vp"])
def test_score_is_grad_log_prob(path):
    gm = GaussianMixtureFlow.random(3, n_components=5, seed=1, path=path)
    x = gm.sample_marginal(0.5, 64, _gen(1), dtype=F64)
    for t in [0.02, 0.3, 0.7, 0.98, 1.0]:
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(gm.log_prob(xr, t).sum(), xr)
        torch.testing.assert_close(gm.score(x, t), g, rtol=1e-10, atol=1e-10)
    # per-sample times too
    t = torch.rand(64, generator=_gen(2), dtype=F64) * 0.9 + 0.05
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gm.log_prob(xr, t).sum(), xr)
    torch.testing.assert_close(gm.score(x, t), g, rtol=1e-10, atol=1e-10)


def test_log_prob_normalised_and_endpoints():
    gm = GaussianMixtureFlow.random(1, n_components=4, seed=3)
    grid = torch.linspace(-12, 12, 20001, dtype=F64)[:, None]
    for t in [0.0, 0.4, 1.0]:
        p = gm.log_prob(grid, t).exp()
        assert abs(float(torch.trapezoid(p, grid[:, 0])) - 1) < 1e-8
    # t = 0 is N(0, 1) for the linear path
    torch.testing.assert_close(gm.log_prob(grid, 0.0), -0.5 * grid[:, 0] ** 2 - 0.5 * math.log(2 * math.pi))
    # diagonal fast path agrees with the full-covariance path
    a = GaussianMixtureFlow([[0.0, 1.0], [2.0, -1.0]], stds=[0.5, 0.8], weights=[0.3, 0.7])
    b = GaussianMixtureFlow(a.means, covs=a.covs + torch.tensor([[0.0, 1e-300], [1e-300, 0.0]], dtype=F64),
                            weights=[0.3, 0.7])
    assert a._diag and not b._diag
    x = torch.randn(50, 2, generator=_gen(4), dtype=F64)
    for t in [0.0, 0.5, 1.0]:
        torch.testing.assert_close(a.velocity(x, t), b.velocity(x, t), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.log_prob(x, t), b.log_prob(x, t), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- consistency with paths.py
@pytest.mark.parametrize("path", ["linear", "cosine", "vp", "polynomial"])
def test_velocity_matches_score_conversion(path):
    gm = GaussianMixtureFlow.random(4, n_components=6, seed=2, path=path)
    p = gm.path
    x = gm.sample_marginal(0.5, 128, _gen(5), dtype=F64)
    t = torch.linspace(0.05, 0.95, 128, dtype=F64)
    v = gm.velocity(x, t)
    torch.testing.assert_close(p.score_to_velocity(gm.score(x, t), x, t), v, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(p.convert(v, x, t, "velocity", "x1"), gm.posterior_x1(x, t), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(p.convert(v, x, t, "velocity", "x0"), gm.posterior_x0(x, t), rtol=1e-8, atol=1e-8)
    # x = alpha E[x1|x] + sigma E[x0|x] exactly
    a, s, _, _ = p.coefficients(t, x)
    torch.testing.assert_close(a * gm.posterior_x1(x, t) + s * gm.posterior_x0(x, t), x, rtol=1e-10, atol=1e-10)


def test_float32_follows_float64():
    gm = GaussianMixtureFlow.random(3, seed=4, path="cosine")
    x = gm.sample_marginal(0.6, 256, _gen(6), dtype=F64)
    t = torch.rand(256, generator=_gen(7), dtype=F64)
    v64 = gm(x, t)
    v32 = gm(x.float(), t.float())
    assert v32.dtype == torch.float32 and v64.dtype == F64
    torch.testing.assert_close(v32.double(), v64, rtol=1e-3, atol=1e-3)
    assert gm.score(x.float(), 0.5).dtype == torch.float32
    assert gm.log_prob(x.float(), 0.5).shape == (256,)
    # image-shaped inputs keep their shape
    gi = GaussianMixtureFlow.random(12, n_components=3, seed=0)
    xi = torch.randn(5, 3, 2, 2)
    assert gi(xi, 0.3).shape == xi.shape


def test_velocity_is_conditional_expectation_monte_carlo():
    """E[v(x_t, t) f(x_t)] = E[u_t f(x_t)] with u_t = alpha' x1 + sigma' x0, for several f."""
    gm = GaussianMixtureFlow.eight_gaussians()
    wrong = GaussianMixtureFlow(gm.means * 1.08, stds=0.2)  # a slightly wrong oracle must fail
    n = 200_000
    g = _gen(8)
    x1 = gm.sample(n, g, dtype=F64)
    x0 = gm.sample_source(n, g, dtype=F64)
    fs = [
        lambda x: torch.ones_like(x[:, 0]),
        lambda x: x[:, 0],
        lambda x: x[:, 1],
        lambda x: torch.tanh(x[:, 0] * x[:, 1]),
        lambda x: torch.sin(2 * x[:, 0]) + torch.cos(x[:, 1]),
        lambda x: torch.exp(-0.5 * ((x - 1) ** 2).sum(1)),
    ]
    for t in [0.25, 0.5, 0.8]:
        xt, ut = gm.path.interpolate(x0, x1, torch.tensor(t, dtype=F64))
        v, vw = gm.velocity(xt, t), wrong.velocity(xt, t)
        worst_ok, worst_wrong = 0.0, 0.0
        for f in fs:
            fx = f(xt)[:, None]
            d = (v - ut) * fx  # zero mean, per coordinate
            z = d.mean(0).abs() / (d.std(0) / math.sqrt(n))
            worst_ok = max(worst_ok, float(z.max()))
            dw = (vw - ut) * fx
            worst_wrong = max(worst_wrong, float((dw.mean(0).abs() / (dw.std(0) / math.sqrt(n))).max()))
        assert worst_ok < 4.5, (t, worst_ok)
        assert worst_wrong > 10, (t, worst_wrong)


# ---------------------------------------------------------------------------- transport
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_transports_source_to_target(path):
    gm = GaussianMixtureFlow.random(3, n_components=5, seed=5, path=path)
    n = 8_000
    x0 = gm.sample_source(n, _gen(9), dtype=F64)
    gm.reset_nfe()
    x1 = _rk4(gm, x0, n_steps=50)
    assert gm.nfe == 200
    se_m, se_c = _moment_tolerances(x1)
    assert ((x1.mean(0) - gm.mean()).abs() < se_m).all()
    assert ((torch.cov(x1.T) - gm.covariance()).abs() < se_c).all()
    # mean log-likelihood under the target equals (within MC error) that of exact samples
    ref = gm.sample(n, _gen(10), dtype=F64)
    lp, lr = gm.log_prob(x1), gm.log_prob(ref)
    assert abs(float(lp.mean() - lr.mean())) < 5 * math.sqrt((lp.var() + lr.var()) / n)


@pytest.mark.parametrize("path", ["linear", "cosine", "vp"])
def test_ode_flow_is_the_quantile_map_in_1d(path):
    """In 1D the ODE flow is monotone, so it is the quantile map: F_1(T(z)) = Phi(z), exactly."""
    gm = GaussianMixtureFlow.random(1, n_components=4, seed=11, path=path)
    z = torch.linspace(-3, 3, 257, dtype=F64)[:, None]
    if path == "vp":  # alpha(0) > 0: start from the exact marginal at t = 0 (std ~ 1), not N(0, 1)
        z = z * gm.covariance(0.0).sqrt()[0] + gm.mean(0.0)
    x1 = _rk4(gm, z, n_steps=100, warp=path == "vp")
    w, mu, sd = gm.weights, gm.means[:, 0], gm.covs[:, 0, 0].sqrt()
    cdf1 = (w * torch.special.ndtr((x1 - mu) / sd)).sum(1)
    if path == "vp":
        mu0, sd0 = mu * gm.path.alpha(torch.tensor(0.0, dtype=F64)), (
            gm.path.alpha(torch.tensor(0.0, dtype=F64)) ** 2 * sd**2 + gm.path.sigma(torch.tensor(0.0, dtype=F64)) ** 2
        ).sqrt()
        cdf0 = (w * torch.special.ndtr((z - mu0) / sd0)).sum(1)
    else:
        cdf0 = torch.special.ndtr(z[:, 0])
    assert float((cdf1 - cdf0).abs().max()) < 1e-6
    assert (x1[1:] > x1[:-1]).all()


def test_marginal_moments_along_the_path():
    gm = GaussianMixtureFlow.random(2, n_components=4, seed=6, path="vp")
    for t in [0.0, 0.5, 1.0]:
        xs = gm.sample_marginal(t, 100_000, _gen(11), dtype=F64)
        se_m, se_c = _moment_tolerances(xs)
        assert ((xs.mean(0) - gm.mean(t)).abs() < se_m).all()
        assert ((torch.cov(xs.T) - gm.covariance(t)).abs() < se_c).all()


def test_sample_moments_labels_and_nfe():
    gm = GaussianMixtureFlow.random(4, n_components=6, seed=7)
    x, k = gm.sample(100_000, _gen(12), dtype=F64, return_labels=True)
    assert x.shape == (100_000, 4) and x.dtype == F64
    se_m, se_c = _moment_tolerances(x)
    assert ((x.mean(0) - gm.mean()).abs() < se_m).all()
    assert ((torch.cov(x.T) - gm.covariance()).abs() < se_c).all()
    freq = torch.bincount(k, minlength=6).double() / 100_000
    assert (freq - gm.weights).abs().max() < 5 * math.sqrt(0.25 / 100_000)
    j = 2
    xj = x[k == j]
    torch.testing.assert_close(xj.mean(0), gm.means[j], atol=0.05, rtol=0)
    # reproducible, default dtype
    torch.testing.assert_close(gm.sample(10, _gen(3)), gm.sample(10, _gen(3)))
    assert gm.sample(10).dtype == torch.get_default_dtype()
    # nfe counts __call__ only
    gm.reset_nfe()
    xx = torch.randn(7, 4)
    for _ in range(3):
        gm(xx, 0.5)
    gm.velocity(xx, 0.5), gm.score(xx, 0.5), gm.posterior_x1(xx, 0.5)
    assert gm.nfe == 3
    gm.reset_nfe()
    assert gm.nfe == 0


def test_component_conditioning():
    gm = GaussianMixtureFlow.random(2, n_components=3, seed=8)
    single = GaussianMixtureFlow(gm.means[1:2], covs=gm.covs[1:2])
    x = torch.randn(6, 2, generator=_gen(13), dtype=F64)
    y = torch.tensor([1, 1, -1, 1, -1, 1])
    v = gm(x, 0.4, y=y)
    c = y >= 0
    torch.testing.assert_close(v[c], single.velocity(x[c], 0.4))
    torch.testing.assert_close(v[~c], gm.velocity(x[~c], 0.4))
    torch.testing.assert_close(gm.log_prob(x, 0.4, y=y)[c], single.log_prob(x[c], 0.4))
    assert gm(x, 0.4, y=None, mask=None).shape == x.shape  # None-valued conditions are ignored
    with pytest.raises(TypeError, match="'y'"):
        gm(x, 0.4, label=y)
    with pytest.raises(ValueError, match="n_components"):
        gm(x, 0.4, y=torch.full((6,), 3))


# ---------------------------------------------------------------------------- path conversion
@pytest.mark.parametrize(
    "src,dst",
    [("linear", "cosine"), ("linear", "vp"), ("linear", "polynomial"), ("linear", {"name": "polynomial", "n": 3.0}),
     ("cosine", "linear"), ("vp", "cosine"), ("cosine", "vp")],
)
def test_path_conversion_is_exact(src, dst):
    kw = dict(n_components=6, seed=9)
    gsrc = GaussianMixtureFlow.random(3, path=src, **kw)
    gdst = GaussianMixtureFlow.random(3, path=get_path(dst), **kw)
    conv = convert_velocity(gsrc, src, dst)
    x = gdst.sample_marginal(0.5, 200, _gen(14), dtype=F64) * 1.3
    t = torch.linspace(0.05, 0.95, 200, dtype=F64)
    gsrc.reset_nfe()
    torch.testing.assert_close(conv(x, t), gdst.velocity(x, t), rtol=1e-8, atol=1e-8)
    assert gsrc.nfe == 1
    for ts in [0.1, 0.5, 0.9]:  # scalar times
        torch.testing.assert_close(conv(x, ts), gdst.velocity(x, ts), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------- construction / validation
def test_constructors_and_validation():
    gm = GaussianMixtureFlow.random(5, n_components=8, seed=0)
    assert gm.dim == 5 and gm.n_components == 8
    assert abs(float(gm.weights.sum()) - 1) < 1e-12
    again = GaussianMixtureFlow.random(5, n_components=8, seed=0)
    torch.testing.assert_close(gm.means, again.means)
    assert not torch.allclose(gm.means, GaussianMixtureFlow.random(5, n_components=8, seed=1).means)
    norms = gm.means.norm(dim=1)
    assert float(norms.max()) <= 2.5 + 1e-9 and float(norms.max()) > 1.5
    ev = torch.linalg.eigvalsh(gm.covs)
    assert (ev > 0).all() and float((ev.max(-1).values / ev.min(-1).values).max()) < 6
    d = torch.cdist(gm.means, gm.means) + 1e9 * torch.eye(8, dtype=F64)
    assert float(d.min()) > 3 * float(ev.max().sqrt())  # well separated
    e8 = GaussianMixtureFlow.eight_gaussians(path="cosine")
    assert e8.dim == 2 and e8.n_components == 8 and e8.path.name == "cosine"
    torch.testing.assert_close(e8.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64))
    # weights are normalised; covs may be shared (D, D)
    g2 = GaussianMixtureFlow([[0.0], [1.0]], covs=[[0.5]], weights=[1.0, 3.0])
    torch.testing.assert_close(g2.weights, torch.tensor([0.25, 0.75], dtype=F64))

    with pytest.raises(ValueError, match="shape"):
        GaussianMixtureFlow([0.0, 1.0])
    with pytest.raises(ValueError, match="covs"):
        GaussianMixtureFlow([[0.0, 0.0]], covs=torch.eye(3))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixtureFlow([[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixtureFlow([[0.0, 0.0]], covs=[[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixtureFlow([[0.0], [1.0]], stds=[1.0, -1.0])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixtureFlow([[0.0], [1.0]], stds=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="not both"):
        GaussianMixtureFlow([[0.0]], covs=[[[1.0]]], stds=1.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureFlow([[0.0], [1.0]], weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureFlow([[0.0], [1.0]], weights=[1.0])
    with pytest.raises(ValueError, match="non-finite"):
        GaussianMixtureFlow([[0.0], [float("nan")]])
    with pytest.raises(ValueError, match="valid names"):
        GaussianMixtureFlow([[0.0]], path="nope")
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        gm(torch.randn(4, 3), 0.5)
    with pytest.raises(ValueError, match="t must"):
        gm(torch.randn(4, 5), torch.rand(3))
    with pytest.raises(TypeError, match="floating"):
        gm(torch.ones(4, 5, dtype=torch.long), 0.5)


def test_inference_mode_and_no_grad():
    gm = GaussianMixtureFlow.random(2, seed=0)
    x = torch.randn(8, 2)
    ref = gm.velocity(x, 0.3)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x, 0.3), ref)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, torch.full((8,), 0.3)), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gm = GaussianMixtureFlow.random(3, seed=0, path="cosine")
    x = torch.randn(32, 3, dtype=F64)
    t = torch.rand(32, dtype=F64)
    v = gm(x.cuda(), t.cuda())
    assert v.device.type == "cuda"
    torch.testing.assert_close(v.cpu(), gm.velocity(x, t))
    g = torch.Generator(device="cuda").manual_seed(0)
    assert gm.sample(10, g).device.type == "cuda"
    assert gm.sample_marginal(0.5, 10, g).device.type == "cuda"
