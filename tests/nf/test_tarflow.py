"""TarFlow and GS-Jacobi: exact invertibility, log-determinants, solver equivalence, guidance, errors, training."""
from __future__ import annotations

import math

import pytest
import torch

import straightflow as sf
from straightflow import nf
from straightflow.data import Dataset


def _model(shape=(1, 4, 4), patch=2, blocks=3, classes=3, seed=0, **kw) -> nf.TarFlow:
    """A float64 TarFlow with non-trivial (random) output projections, so no block is the identity."""
    torch.manual_seed(seed)
    m = nf.TarFlow(shape, patch_size=patch, blocks=blocks, width=16, layers=1, heads=2, num_classes=classes, **kw)
    for b in m.blocks:
        torch.nn.init.normal_(b.proj_out.weight, std=0.2)
        torch.nn.init.normal_(b.proj_out.bias, std=0.2)
    return m.double().eval()


def test_forward_then_inverse_is_exact():
    m = _model()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    z, _ = m(x, y)
    assert (z - x).abs().max() > 1e-2  # the flow does something
    assert torch.allclose(m.decode(z, y), x, atol=1e-12, rtol=0)


def test_vector_data_one_token_per_dim_is_exact():
    m = _model(shape=(6,), patch=1, classes=None)
    x = torch.randn(4, 6, dtype=torch.float64)
    z, _ = m(x)
    assert torch.allclose(m.decode(z), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape,patch", [((6,), 1), ((6,), 2), ((1, 4, 4), 2)])
def test_logdet_matches_jacrev(shape, patch):
    m = _model(shape=shape, patch=patch, classes=None)
    x = torch.randn(1, *shape, dtype=torch.float64)
    _, logdet = m(x)
    jac = torch.func.jacrev(lambda v: m(v.reshape(1, *shape))[0].reshape(-1))(x.reshape(-1))
    sign, ref = torch.linalg.slogdet(jac)
    assert sign > 0
    assert torch.allclose(logdet[0], ref, atol=1e-10)
    # and the likelihood is the change of variables under the Gaussian prior
    z, _ = m(x)
    n = x[0].numel()
    lp = ref - 0.5 * z.pow(2).sum() - 0.5 * n * math.log(2 * math.pi)
    assert torch.allclose(m.log_prob(x)[0], lp, atol=1e-10)


@pytest.mark.parametrize("segments,front", [(1, False), (2, False), (3, False), (7, False), (1, True), (3, True)])
def test_gs_jacobi_at_tolerance_zero_equals_sequential(segments, front):
    m = _model()
    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    ref = m.decode(z, y)
    x, stats = nf.gs_jacobi(m, z, y, tol=0.0, segments=segments, front=front)
    assert (x - ref).abs().max() < 1e-12
    assert len(stats.calls) == len(m.blocks) and stats.total_calls == sum(map(sum, stats.iterations))
    # the iteration count never exceeds the tokens (exactness cap): at most T - 1 calls per block
    assert all(c <= m.tokens - 1 for c in stats.calls)


def test_gs_jacobi_plan_from_metrics_and_guided_match_sequential():
    m = _model()
    data = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    metrics = nf.block_metrics(m, data)
    assert len(metrics) == 3 and abs(sum(d["crm_share"] for d in metrics) - 1) < 1e-9
    plan = nf.plan_from_metrics(metrics, segments=1, tough_segments=3)
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([2, 0, 1])
    for kind in nf.GUIDANCE_KINDS:
        ref = m.decode(z, y, guidance=2.0, kind=kind)
        x, _ = nf.gs_jacobi(m, z, y, plan=plan, tol=0.0, guidance=2.0, kind=kind)
        assert (x - ref).abs().max() < 1e-12
    # a loose tolerance stops early and stays close; the moving front too
    for front in (False, True):
        out = nf.sample_nf(m, z, y, solver="gs-jacobi", tol=1e-3, denoise=False, front=front)
        assert (out.x - m.decode(z, y)).abs().max() < 1e-1


@pytest.mark.parametrize("kind", ["tarflow", "starflow"])
def test_guidance_at_scale_one_equals_unguided(kind):
    m = _model()
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    assert torch.allclose(m.decode(z, y, guidance=1.0, kind=kind), m.decode(z, y), atol=1e-12, rtol=0)
    assert (m.decode(z, y, guidance=3.0, kind=kind) - m.decode(z, y)).abs().max() > 1e-4


def test_likelihood_is_invariant_to_batch_size():
    m = _model()
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    full = m.log_prob(x, y)
    single = torch.cat([m.log_prob(x[i:i + 1], y[i:i + 1]) for i in range(7)])
    assert torch.allclose(full, single, atol=1e-10, rtol=0)


def test_bits_per_dim_convention():
    m = _model(classes=None)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64).clamp(-1, 1)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    bpd = m.bits_per_dim(x, levels=256, generator=g1)
    u = (torch.rand(x.shape, generator=g2, dtype=x.dtype) - 0.5) * (2 / 255)
    ref = (-m.log_prob(x + u) / 16 + math.log(255 / 2)) / math.log(2)
    assert torch.allclose(bpd, ref, atol=1e-10)


def test_denoise_step_is_sigma_squared_score():
    m = _model(classes=None, noise_std=0.1)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.log_prob(xg).sum(), xg)
    assert torch.allclose(m.denoise(x), x + 0.01 * g, atol=1e-12)
    assert torch.equal(m.denoise(x, sigma=0.0), x)


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(ValueError, match="does not divide") as e:
        nf.TarFlow((1, 7, 7), patch_size=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not divide"):
        nf.TarFlow((10,), patch_size=3)
    m = _model()
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 1, 4, 4\)") as e:
        m.log_prob(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expected a batch"):
        nf.gs_jacobi(m, torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown normalizing-flow solver 'euler'; valid names: gs-jacobi, sequential"):
        nf.sample_nf(m, 2, solver="euler")
    with pytest.raises(ValueError, match="class-conditional"):
        _model(classes=None).decode(torch.randn(1, 1, 4, 4, dtype=torch.float64), guidance=2.0)


def test_tiny_training_decreases_nll_and_reloads(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g) * torch.tensor([1.0, 0.3, 0.5, 0.2]) + torch.tensor([0.5, -1.0, 0.0, 1.0])
    ds = Dataset(x, name="gauss4")
    cfg = {"name": "tarflow", "sample_shape": [4], "patch_size": 1, "blocks": 2, "width": 16, "layers": 1,
           "heads": 2, "noise_std": 0.0}
    res = nf.train_nf(ds, tmp_path / "run", model_config=cfg, steps=60, batch_size=128, lr=3e-3, warmup=1,
                      ema_decay=0.0, ckpt_every=30, progress=False)
    first, last = res.history[0][1], res.history[-1][1]
    assert last < first - 0.1
    m = sf.load(tmp_path / "run")
    assert isinstance(m, nf.TarFlow) and nf.is_nf_config(m.run_config)
    with torch.no_grad():
        assert torch.allclose(m.log_prob(x[:8]), res.model.log_prob(x[:8]), atol=1e-5)
    # a finished run asked again trains nothing (resume path of the library's trainer)
    again = nf.train_nf(ds, tmp_path / "run", model_config=cfg, steps=60, batch_size=128, lr=3e-3, warmup=1,
                        ema_decay=0.0, ckpt_every=30, progress=False)
    assert again.resumed_from == 60


def test_starflow_trains_saves_reloads_and_samples(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 1, 8, 8, generator=g) * 2 - 1).clamp(-1, 1)
    y = torch.arange(64) % 2
    ds = Dataset(x, y, 2, name="tiny")
    m = nf.train_starflow(ds, tmp_path / "sf", ae_steps=3, flow_steps=3, denoiser_steps=2, deep_layers=2, layers=1,
                          blocks=2, width=16, batch_size=16, base_channels=8, latent_channels=2, progress=False)
    assert [len(b.net.layers) for b in m.latent_flow.blocks] == [1, 2]  # deep block next to the prior
    r = sf.load(tmp_path / "sf")
    assert isinstance(r, nf.StarFlow) and nf.is_nf_config(r.run_config)
    with torch.no_grad():
        assert torch.allclose(r.log_prob(x[:4], y[:4]), m.eval().log_prob(x[:4], y[:4]), atol=1e-5)
    z = torch.randn(3, *r.latent_flow.sample_shape, generator=g)
    a = nf.sample_nf(r, z, y[:3], solver="sequential", guidance=2.0, kind="starflow")
    b = nf.sample_nf(r, z, y[:3], solver="gs-jacobi", tol=0.0, guidance=2.0, kind="starflow")
    assert a.x.shape == (3, 1, 8, 8) and (a.x - b.x).abs().max() < 1e-4
