"""Velocity models (MLP, UNet), the model registry, and run-directory checkpoints."""
from __future__ import annotations

import json
import os

import pytest
import torch

from straightflow import checkpoint
from straightflow.io import CheckpointError
from straightflow.models import MLP, MODELS, UNet, available, build_model, count_parameters
from straightflow.models.embed import SinusoidalTimeEmbedding, drop_labels, timestep_features
from straightflow.registry import UnknownNameError


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Batches here are tiny: one thread is faster, and immune to OpenMP stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb_output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The output layer is zero-initialised; give it random weights so outputs depend on inputs."""
    layer = model.out if isinstance(model, MLP) else model.conv_out
    torch.manual_seed(123)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.bias.normal_(0, 0.05)
    return model


def _inputs(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.sample_shape), generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g) if model.num_classes else None
    return x, t, y


MODEL_CASES = [
    {"name": "mlp", "dim": 2},
    {"name": "mlp", "dim": 64, "hidden": 64, "depth": 2, "num_classes": 10},
    {"name": "unet", "in_channels": 1, "resolution": 8},
    {"name": "unet", "in_channels": 1, "resolution": 8, "num_classes": 10},
    {"name": "unet", "in_channels": 3, "resolution": 16, "base_channels": 16, "num_classes": 5,
     "attention_resolutions": [8]},
    {"name": "unet", "in_channels": 1, "resolution": 28, "base_channels": 16, "channel_mults": [1, 2, 2],
     "num_classes": 10, "attention_resolutions": [7]},
    {"name": "unet", "in_channels": 3, "resolution": 32, "base_channels": 16, "channel_mults": [1, 2, 2]},
]


def _ids(cfg):
    return "-".join(f"{v}" if k == "name" else f"{k}{v}" for k, v in cfg.items()).replace(" ", "")


# ----------------------------------------------------------------------------- embeddings


def test_time_features_and_embedding():
    t = torch.tensor([0.0, 0.5, 1.0])
    f = timestep_features(t, 16)
    assert f.shape == (3, 16)
    assert torch.allclose(f[0, :8], torch.ones(8)) and torch.allclose(f[0, 8:], torch.zeros(8))
    # t is scaled by 1000: the highest frequency (1) sees 1000 * t
    assert torch.allclose(f[2, 0], torch.cos(torch.tensor(1000.0)))
    assert timestep_features(t, 7).shape == (3, 7)
    emb = SinusoidalTimeEmbedding(32)
    assert emb(t).shape == (3, 128)
    assert emb(0.3, batch=5).shape == (5, 128)


def test_drop_labels():
    y = torch.arange(1000) % 10
    g = torch.Generator().manual_seed(0)
    d = drop_labels(y, 0.3, null_class=10, generator=g)
    frac = (d == 10).float().mean().item()
    assert 0.2 < frac < 0.4
    assert torch.equal(d[d != 10], y[d != 10])
    assert torch.equal(drop_labels(y, 0.0, 10), y)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("cfg", MODEL_CASES, ids=_ids)
def test_shapes_and_scalar_t(cfg):
    model = _perturb_output_layer(build_model(cfg)).eval()
    assert model.config["name"] == cfg["name"]
    x, t, y = _inputs(model, batch=3)
    with torch.no_grad():
        v = model(x, t, y=y)
        assert v.shape == x.shape and v.dtype == x.dtype
        assert torch.isfinite(v).all()
        # scalar t (python float and 0-d tensor) broadcasts to the batch
        v_scalar = model(x, 0.25, y=y)
        v_full = model(x, torch.full((3,), 0.25), y=y)
        assert torch.allclose(v_scalar, v_full, atol=1e-6)
        assert torch.allclose(model(x, torch.tensor(0.25), y=y), v_full, atol=1e-6)
        assert not torch.allclose(v_full, model(x, torch.full((3,), 0.75), y=y))


def test_fresh_model_predicts_zero():
    for model in (MLP(dim=2), UNet(resolution=8)):
        x, t, _ = _inputs(model)
        assert torch.count_nonzero(model(x, t)) == 0


def test_mlp_flattens_extra_dims_and_rejects_wrong_dim():
    model = _perturb_output_layer(MLP(dim=12, hidden=32, depth=1))
    x = torch.randn(2, 3, 4)
    assert model(x, torch.rand(2)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="dim=12"):
        model(torch.randn(2, 5), torch.rand(2))


# ----------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("cfg", [c for c in MODEL_CASES if c.get("num_classes")], ids=_ids)
def test_null_class_and_class_dependence(cfg):
    model = _perturb_output_layer(build_model(cfg)).eval()
    k = cfg["num_classes"]
    assert model.num_classes == k and model.null_class == k
    x, t, _ = _inputs(model, batch=4)
    with torch.no_grad():
        v_none = model(x, t)
        v_null = model(x, t, y=torch.full((4,), k, dtype=torch.long))
        assert torch.equal(v_none, v_null)
        v0 = model(x, t, y=torch.zeros(4, dtype=torch.long))
        v1 = model(x, t, y=torch.ones(4, dtype=torch.long))
        assert (v0 - v1).abs().max() > 1e-5
        assert (v0 - v_null).abs().max() > 1e-5
        # an int label broadcasts
        assert torch.equal(model(x, t, y=1), v1)
    with pytest.raises(ValueError, match="null class"):
        model(x, t, y=torch.full((4,), k + 1, dtype=torch.long))
    with pytest.raises(TypeError):
        model(x, t, y=torch.zeros(4))


def test_unconditional_models_refuse_labels():
    for model in (MLP(dim=2), UNet(resolution=8)):
        assert model.num_classes is None and model.null_class is None
        x, t, _ = _inputs(model, batch=2)
        with pytest.raises(ValueError, match="unconditional"):
            model(x, t, y=torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- UNet specifics


def test_unet_bad_resolution():
    with pytest.raises(ValueError, match="divisible"):
        UNet(resolution=28, channel_mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="divisible"):
        UNet(resolution=10, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(resolution=8, attention_resolutions=(2,))
    UNet(resolution=28, channel_mults=(1, 2, 2))  # 28 -> 14 -> 7 is fine


def test_unet_rejects_wrong_input():
    model = UNet(resolution=8)
    with pytest.raises(ValueError, match="in_channels|expects"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 1, 7, 7), torch.rand(2))


def test_unet_gradient_reaches_every_parameter():
    model = UNet(resolution=8, num_classes=10, attention_resolutions=(4, 8))
    _perturb_output_layer(model).train()
    x, t, _ = _inputs(model, batch=12)
    y = torch.arange(12) % 11  # includes the null class (10)
    model(x, t, y=y).pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"no gradient for {dead}"


def test_unet_default_size():
    n = count_parameters(UNet(resolution=8, num_classes=10))
    assert 100_000 <= n <= 400_000, n


# ----------------------------------------------------------------------------- registry / config


def test_registry_and_build_errors():
    assert {"mlp", "unet", "dit", "autoencoder", "blockwise"} <= set(available()) and "unet" in MODELS
    with pytest.raises(UnknownNameError, match="mlp, .*unet"):
        build_model({"name": "transformer"})
    with pytest.raises(ValueError, match="unknown argument.*widht.*accepted"):
        build_model({"name": "mlp", "dim": 2, "widht": 3})
    with pytest.raises(ValueError, match="missing required argument.*dim"):
        build_model({"name": "mlp"})
    with pytest.raises(ValueError, match="name"):
        build_model({"dim": 2})
    with pytest.raises(ValueError, match="activation"):
        MLP(dim=2, act="nope")


@pytest.mark.parametrize("cfg", MODEL_CASES, ids=_ids)
def test_config_round_trip(cfg):
    model = _perturb_output_layer(build_model(cfg)).eval()
    assert json.loads(json.dumps(model.config)) == model.config  # JSON-able, tuples as lists
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y=y), rebuilt(x, t, y=y))


def test_config_has_all_kwargs():
    m = UNet(resolution=16, channel_mults=(1, 2, 2))
    assert m.config == {
        "name": "unet", "in_channels": 1, "resolution": 16, "base_channels": 32, "channel_mults": [1, 2, 2],
        "num_res_blocks": 1, "attention_resolutions": [], "num_classes": None, "dropout": 0.0, "time_dim": None,
    }
    assert MLP(dim=3).config == {
        "name": "mlp", "dim": 3, "hidden": 256, "depth": 4, "time_dim": 64, "num_classes": None, "act": "silu",
    }


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cfg", [MODEL_CASES[1], MODEL_CASES[3]], ids=_ids)
def test_save_load_round_trip(tmp_path, cfg):
    model = _perturb_output_layer(build_model(cfg)).eval()
    run = tmp_path / "run"
    checkpoint.save_model(run, model, {"flow": {"path": "linear"}, "train": {"steps": 3}})
    assert sorted(os.listdir(run)) == ["config.json", "model.safetensors"]
    cfg_on_disk = checkpoint.load_config(run)
    assert cfg_on_disk["model"] == model.config
    assert cfg_on_disk["flow"] == {"path": "linear"} and "straightflow_version" in cfg_on_disk
    loaded = checkpoint.load(run)
    assert not loaded.training
    assert all(p.requires_grad for p in loaded.parameters())
    assert loaded.run_config == cfg_on_disk
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y=y), loaded(x, t, y=y))


def test_save_alternate_weights_file(tmp_path):
    model = _perturb_output_layer(MLP(dim=2, hidden=16, depth=1))
    checkpoint.save_model(tmp_path, model, weights="model_raw.safetensors")
    loaded = checkpoint.load(tmp_path, weights="model_raw.safetensors")
    x, t, _ = _inputs(model)
    assert torch.equal(model(x, t), loaded(x, t))


def _saved_run(tmp_path):
    run = tmp_path / "run"
    checkpoint.save_model(run, _perturb_output_layer(MLP(dim=2, hidden=16, depth=1)), {})
    return run


def test_truncated_weights_refused(tmp_path):
    run = _saved_run(tmp_path)
    w = run / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        checkpoint.load(run)
    w.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(run)


def test_random_bytes_refused(tmp_path):
    run = _saved_run(tmp_path)
    (run / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load(run)


def test_pickle_refused(tmp_path):
    run = _saved_run(tmp_path)
    model = MLP(dim=2, hidden=16, depth=1)
    torch.save(model.state_dict(), run / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(run)


def test_missing_files_refused(tmp_path):
    run = _saved_run(tmp_path)
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(run)
    run = _saved_run(tmp_path / "b")
    (run / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json.*not found"):
        checkpoint.load(run)
    with pytest.raises(CheckpointError, match="run directory not found"):
        checkpoint.load(tmp_path / "nowhere")


def test_corrupt_config_refused(tmp_path):
    run = _saved_run(tmp_path)
    (run / "config.json").write_text('{"model": {"name": "mlp", ')
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoint.load(run)
    (run / "config.json").write_text('{"train": {}}')
    with pytest.raises(CheckpointError, match="'model'"):
        checkpoint.load(run)
    (run / "config.json").write_text('{"model": {"name": "resnet"}}')
    with pytest.raises(CheckpointError, match="cannot build.*mlp, .*unet"):
        checkpoint.load(run)


def test_mismatched_architecture_refused(tmp_path):
    run = _saved_run(tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["hidden"] = 32  # shapes differ
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*inp\.weight"):
        checkpoint.load(run)
    cfg["model"]["hidden"] = 16
    cfg["model"]["depth"] = 2  # keys missing from the file
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\."):
        checkpoint.load(run)
    cfg["model"]["depth"] = 0  # keys the model does not have
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\."):
        checkpoint.load(run)


def test_save_requires_config(tmp_path):
    with pytest.raises(TypeError, match="config"):
        checkpoint.save_model(tmp_path / "run", torch.nn.Linear(2, 2), {})
    assert not (tmp_path / "run").exists()
