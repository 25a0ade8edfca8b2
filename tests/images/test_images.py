"""Image-scale flows: DiT, autoencoder, latent flow, fast/compiled sampling, shift, Bottleneck Sampling."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import straightflow as sf
from straightflow.data import random_hflip, shapes
from straightflow.images import bottleneck_sample, fast_sample, sample_to_files, shift_for, shifted_grid_for
from straightflow.images.fast import can_compile
from straightflow.images.latent import (LatentFlow, load_latent, train_autoencoder, train_latent_flow)
from straightflow.models import Autoencoder, DiT, UNet, build_model


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers give v = 0; random weights make outputs depend on inputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        if isinstance(model, DiT):
            layers = [model.final.ada, model.final.linear] + [b.ada for b in model.blocks]
        else:
            layers = [model.conv_out]
        for layer in layers:
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.05)
    return model.eval()


# ----------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("cond_mode", ["add", "concat"])
def test_dit_shapes_and_class_conditioning(cond_mode):
    m = DiT(in_channels=3, resolution=8, patch_size=2, hidden=32, depth=2, heads=2, num_classes=5,
            cond_mode=cond_mode)
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    assert m.sample_shape == (3, 8, 8) and m.null_class == 5
    assert torch.equal(m(x, t, torch.arange(4)), torch.zeros_like(x))  # adaLN-Zero + zero final layer
    _perturb(m)
    y = torch.tensor([0, 1, 2, 3])
    out = m(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # y=None means the null class; another class changes every sample's output
    assert torch.allclose(m(x, t), m(x, t, torch.full((4,), 5)))
    assert not torch.allclose(out, m(x, t, (y + 1) % 5))
    with pytest.raises(ValueError, match="class labels must be in"):
        m(x, t, torch.full((4,), 6))


def test_dit_other_resolutions_and_errors():
    for pos in ("sincos", "learned"):
        m = _perturb(DiT(1, 8, 2, 32, 1, 2, pos_embed=pos))
        assert m(torch.randn(2, 1, 16, 12), torch.rand(2)).shape == (2, 1, 16, 12)
        assert m(torch.randn(2, 1, 4, 4), 0.5).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        m(torch.randn(1, 1, 7, 8), 0.5)
    with pytest.raises(ValueError, match="cond_mode"):
        DiT(cond_mode="cat")
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(1, 1, 8, 8), 0.5, torch.tensor([0]))


def test_dit_config_rebuild_and_checkpoint_round_trip(tmp_path):
    m = _perturb(DiT(1, 8, 2, 32, 2, 2, num_classes=3, cond_mode="concat", pos_embed="learned"))
    assert m.config["name"] == "dit"
    m2 = build_model(json.loads(json.dumps(m.config)))
    assert m2.config == m.config
    assert {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    sf.save_model(tmp_path, m)
    m3 = sf.load(tmp_path)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 3])
    assert isinstance(m3, DiT) and torch.equal(m3(x, t, y), m(x, t, y))


# ----------------------------------------------------------------------------- autoencoder


def test_autoencoder_shapes_stats_and_checkpoint(tmp_path):
    ae = Autoencoder(in_channels=3, resolution=32, base_channels=8, channel_mults=(1, 2, 2), latent_channels=4)
    assert ae.latent_shape == (4, 8, 8)
    x = torch.randn(5, 3, 32, 32)
    z = ae.encode(x)
    assert z.shape == (5, 4, 8, 8) and ae.decode(z).shape == x.shape
    mean, std = ae.fit_latent_stats(x)
    z = ae.encode(x)  # normalised: per-channel mean 0, std 1 on the fitted set
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(ae.decode(z), ae(x), atol=1e-5)  # normalisation is undone exactly
    assert ae.config["latent_scale"] == pytest.approx(std) and ae.config["latent_shift"] == pytest.approx(mean)
    sf.save_model(tmp_path, ae)
    ae2 = sf.load(tmp_path)
    assert torch.allclose(ae2.encode(x), ae.encode(x), atol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        Autoencoder(resolution=30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="latent_shift/latent_scale need 4"):
        ae.set_latent_stats([0.0], [1.0])


def test_autoencoder_training_reconstructs(tmp_path):
    ds = shapes(128, resolution=16, channels=1, seed=0)
    ae, res = train_autoencoder(ds, tmp_path / "ae", 150, base_channels=8, channel_mults=(1, 2), batch_size=32,
                                lr=3e-3, warmup=10, progress=False)
    with torch.no_grad():
        err = float(torch.mean((ae(ds.x).clamp(-1, 1) - ds.x) ** 2))
    assert err < 0.1 * float(ds.x.var()), err
    assert ae.recon["psnr"] > 15
    loaded = sf.load(tmp_path / "ae")
    assert loaded.config["latent_scale"] is not None
    assert torch.allclose(loaded.encode(ds.x[:4]), ae.encode(ds.x[:4]), atol=1e-5)
    # resume: the finished run is reloaded, not retrained
    ae2, res2 = train_autoencoder(ds, tmp_path / "ae", 150, base_channels=8, channel_mults=(1, 2), batch_size=32,
                                  lr=3e-3, warmup=10, progress=False)
    assert res2.steps == 150 and torch.equal(ae2.encode(ds.x[:4]), ae.encode(ds.x[:4]))


# ----------------------------------------------------------------------------- latent flow


def test_latent_flow_end_to_end(tmp_path):
    ds = shapes(48, resolution=16, channels=3, seed=1)
    res = train_latent_flow(ds, tmp_path / "run", ae_steps=15, flow_steps=15, model="dit", width=32, depth=1,
                            ae_kwargs={"base_channels": 8, "channel_mults": (1, 2)}, batch_size=16, progress=False,
                            hflip=True)
    assert (tmp_path / "run" / "autoencoder" / "model.safetensors").is_file()
    cfg = sf.load_config(tmp_path / "run")
    assert cfg["latent"]["autoencoder"] == "autoencoder" and cfg["data"]["shape"] == [4, 8, 8]
    assert cfg["data"]["size"] == 96  # hflip encodes every image and its mirror image
    lf = load_latent(tmp_path / "run")
    assert isinstance(lf, LatentFlow) and lf.latent_shape == (4, 8, 8) and lf.sample_shape == (3, 16, 16)
    y = torch.tensor([0, 1, 4])
    out = lf.sample(3, solver="midpoint", steps=2, seed=0, cond={"y": y})
    assert out.x.shape == (3, 3, 16, 16) and out.nfe == 4 and out.info["latent"].shape == (3, 4, 8, 8)
    assert float(out.x.abs().max()) <= 1.0
    ref = res.flow.sample(3, solver="midpoint", steps=2, seed=0, cond={"y": y})
    assert torch.allclose(out.x, ref.x, atol=1e-5)
    with pytest.raises(sf.CheckpointError, match="no 'latent' section"):
        load_latent(tmp_path / "run" / "autoencoder")


# ----------------------------------------------------------------------------- fast sampling


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
@torch.no_grad()
def test_fast_sample_matches_reference_solver(solver):
    m = _perturb(UNet(1, 8, 8, (1, 2), num_classes=3))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    ref = sf.sample(m, x, solver=solver, steps=5, grid="shifted", cond={"y": y})
    out = fast_sample(m, x, solver=solver, steps=5, grid="shifted", cond={"y": y})
    assert out.nfe == ref.nfe
    assert torch.allclose(out.x, ref.x, atol=1e-6)
    half = fast_sample(m, x, solver=solver, steps=5, grid="shifted", cond={"y": y}, bf16=True)
    err = float((half.x - ref.x).abs().max())
    assert 0 < err < 0.05  # bf16 network, fp32 state: close, not identical
    with pytest.raises(ValueError, match="fast sampling supports"):
        fast_sample(m, x, solver="rk4", steps=2)


def _compile_case():
    m = _perturb(DiT(1, 8, 2, 32, 1, 2))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return m, x, fast_sample(m, x, "midpoint", 3)


def test_compiled_graph_equals_eager():
    """Dynamo capture of the model inside the fixed-step loop (aot_eager backend: no C++ needed)."""
    m, x, eager = _compile_case()
    torch._dynamo.reset()
    out = fast_sample(torch.compile(m, backend="aot_eager", dynamic=False), x, "midpoint", 3)
    assert torch.allclose(out.x, eager.x, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: UNet(1, 8, 8, (1, 2), num_classes=10),
                                  lambda: DiT(1, 8, 2, 32, 1, 2, num_classes=10)], ids=["unet", "dit"])
def test_class_conditional_models_capture_without_graph_breaks(make):
    """The eager-only label range check must not split the compiled graph (one graph, no breaks)."""
    m = make().eval()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(x, t, y=torch.tensor([0, 3, 9, 10]))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    with pytest.raises(ValueError, match="class labels must be in"):  # eager still checks the range
        m(x, t, y=torch.tensor([0, 1, 2, 11]))


@pytest.mark.slow
def test_inductor_compiled_equals_eager():
    reason = can_compile()
    if reason:
        pytest.skip(reason)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # worker pools cost more than they save on a busy 2-core box
    m, x, eager = _compile_case()
    torch._dynamo.reset()
    out = fast_sample(m, x, "midpoint", 3, compile=True)
    assert out.info["compiled"] and torch.allclose(out.x, eager.x, atol=1e-4)


def test_sample_to_files_writes_and_resumes(tmp_path):
    m = _perturb(UNet(3, 8, 8, (1, 2), num_classes=2))
    s = sample_to_files(m, 5, tmp_path, batch=2, steps=2, seed=3, progress=False)
    assert s["nfe"] == 2 and s["sampled_now"] == 5
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    with np.load(tmp_path / "samples.npz") as z:
        x1, y1 = z["x"], z["y"]
    assert x1.shape == (5, 3, 8, 8) and list(y1) == [0, 1, 0, 1, 0]
    # a finished batch part is reused (resume), the others are recomputed: same images
    again = tmp_path / "again"
    (again / ".parts").mkdir(parents=True)
    first = sample_to_files(m, 2, tmp_path / "first", batch=2, steps=2, seed=3, progress=False, png=False)
    assert first["n"] == 2
    import shutil

    (tmp_path / "first" / "samples.npz").rename(again / ".parts" / "batch_000000.npz")
    s2 = sample_to_files(m, 5, again, batch=2, steps=2, seed=3, progress=False, png=False)
    assert s2["sampled_now"] == 3
    with np.load(again / "samples.npz") as z:
        assert np.array_equal(z["x"], x1)
    shutil.rmtree(again)


# ----------------------------------------------------------------------------- shift


def test_resolution_shift_formula():
    assert shift_for(64, 32) == pytest.approx(2.0)
    assert shift_for(32, 32) == pytest.approx(1.0)
    assert shift_for((28, 56), 28) == pytest.approx(math.sqrt(2.0))
    s = shift_for(64, 32)
    g = shifted_grid_for(4, 64, 32)
    sigma = 1 - torch.linspace(0, 1, 5, dtype=torch.float64)
    assert torch.allclose(g, 1 - s * sigma / (1 + (s - 1) * sigma))
    assert torch.allclose(shifted_grid_for(4, 32, 32), torch.linspace(0, 1, 5, dtype=torch.float64))
    assert float(g[1]) < 0.25  # shift > 1 spends more steps at the noisy end


# ----------------------------------------------------------------------------- bottleneck


@pytest.mark.parametrize("model", ["unet", "dit"])
@torch.no_grad()
def test_bottleneck_sampling_shapes_nfe_and_plain_equivalence(model):
    m = _perturb(UNet(1, 16, 8, (1, 2), num_classes=3) if model == "unet" else DiT(1, 16, 2, 32, 1, 2, num_classes=3))
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    out = bottleneck_sample(m, x, solver="heun", stage_steps=(2, 3, 2), cond={"y": y}, renoise=0.1, seed=0)
    assert out.x.shape == x.shape and torch.isfinite(out.x).all()
    assert out.nfe == 2 * 7 + 2 and out.info["nfe_low"] == 6 + 1 and out.info["nfe_high"] == 8 + 1
    assert out.info["full_res_nfe"] == pytest.approx(9 + 7 / 4)
    plain = sf.sample(m, x, solver="heun", steps=7, cond={"y": y})
    for kw in ({"factor": 1}, {"stage_steps": (3, 0, 4)}):
        args = {"stage_steps": (2, 3, 2), **kw}
        same = bottleneck_sample(m, x, solver="heun", cond={"y": y}, **args)
        assert torch.equal(same.x, plain.x) and same.nfe == plain.nfe
    with pytest.raises(ValueError, match="not divisible by factor"):
        bottleneck_sample(m, torch.randn(1, 1, 18, 18), factor=4)


def test_random_hflip():
    x = torch.randn(6, 2, 4, 5)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1)) and torch.equal(random_hflip(x, p=0.0), x)
    y = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(6)]
    assert all(f or torch.equal(y[i], x[i]) for i, f in enumerate(flipped))


# ----------------------------------------------------------------------------- CLI, bench


def test_cli_latent_and_generate(tmp_path):
    from straightflow.cli import main

    run, gen = tmp_path / "run", tmp_path / "gen"
    assert main(["latent", "--data", "shapes", "--n", "32", "--out", str(run), "--ae-steps", "4",
                 "--flow-steps", "4", "--width", "32", "--depth", "1", "--ae-channels", "8", "--batch-size", "8",
                 "--quiet"]) == 0
    assert main(["generate", str(run), "--n", "3", "--batch", "2", "--steps", "2", "--out", str(gen),
                 "--quiet"]) == 0
    with np.load(gen / "samples.npz") as z:
        assert z["x"].shape == (3, 1, 16, 16)
    assert len(list(gen.glob("*.png"))) == 3
    # eval samples latents, decodes them and scores the images (it used to feed pixel noise to the DiT)
    md = tmp_path / "e.md"
    assert main(["eval", str(run), "--nfe", "2", "--n", "8", "--extractor", "digits", "--metric", "mmd",
                 "--out", str(md), "--quiet"]) == 0
    assert "| euler | 2 |" in md.read_text()
    assert main(["latent", "--data", "shapes", "--out", str(tmp_path / "x"), "--ae-steps", "0"]) == 2


@pytest.mark.slow
def test_bench_images_quick(tmp_path):
    from benchmarks.images import main

    assert main(["--out", str(tmp_path), "--quick"]) == 0
    md = (tmp_path / "images.md").read_text()
    assert "FD" in md and "images/s" in md
    data = json.loads((tmp_path / "images.json").read_text())
    assert data["datasets"]
