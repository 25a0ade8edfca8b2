"""LoRA through peft: the adapter trains alone, saves as safetensors with the run and reloads exactly; the same
code wraps a (tiny, random) diffusers transformer through straightflow.interop."""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="LoRA needs peft (pip install 'straightflow[align]')")

import straightflow as sf  # noqa: E402
from straightflow.align import align  # noqa: E402
from straightflow.align.base import write_run  # noqa: E402
from straightflow.align.lora import adapter_state, apply_lora, load_adapter, trainable_fraction  # noqa: E402
from straightflow.align.prefs import as_preferences  # noqa: E402
from straightflow.align.rewards import InkReward  # noqa: E402
from straightflow.models import UNet  # noqa: E402


def test_lora_run_saves_merged_weights_and_the_adapter(tmp_path):
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    sf.save_model(base_dir, UNet(in_channels=1, resolution=8, base_channels=8, channel_mults=(1,), num_classes=3),
                  {"data": {"name": "digits", "shape": [1, 8, 8]}})
    res = align(str(base_dir), method="sft", reward=InkReward(), lora={"r": 2}, out=tmp_path / "run", steps=3,
                n_data=8, batch_size=4, lr=5e-2, progress=False, gen_steps=2)
    run = tmp_path / "run"
    assert (run / "adapter.safetensors").is_file() and (run / "model.safetensors").is_file()
    cfg = sf.load_config(run)
    assert cfg["align"]["lora"]["r"] == 2 and cfg["model"]["name"] == "unet"
    assert 0 < trainable_fraction(res.module.policy) < 0.5
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 3])
    merged = sf.load(run)  # every command sees a plain UNet with the adapter merged in
    with_adapter = load_adapter(run, sf.load(base_dir))
    base = sf.load(base_dir)
    with torch.no_grad():
        assert torch.allclose(merged(x, t, y=y), with_adapter(x, t, y=y), atol=1e-5)
        assert not torch.allclose(merged(x, t, y=y), base(x, t, y=y), atol=1e-4)  # it did train
        # the base weights inside the wrapped model never moved
        inner = res.module.policy.get_base_model()
        for name, p in base.named_parameters():
            key = name.rsplit(".", 1)
            mod = inner.get_submodule(key[0]) if len(key) > 1 else inner
            w = getattr(getattr(mod, "base_layer", mod), key[-1])
            assert torch.equal(w, p), name
    st = sf.io.load_tensors(run / "adapter.safetensors")
    assert st and all("lora_" in k for k in st)


def test_lora_on_a_tiny_diffusers_transformer(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    from straightflow.align.dpo import FlowDPO
    from straightflow.interop import DiffusersVelocity

    torch.manual_seed(0)
    tr = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                         pooled_projection_dim=16, out_channels=4)
    fresh = copy.deepcopy(tr)
    policy = apply_lora(DiffusersVelocity(tr), r=2)
    with torch.no_grad():  # a non-trivial adapter
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    prefs = as_preferences(x, torch.arange(4), [{"id": 0, "chosen": 0, "rejected": 1}, {"id": 1, "chosen": 2, "rejected": 3}])
    obj = FlowDPO(policy, preferences=prefs, reg=100.0)
    assert obj.reference is None  # the reference is the same network with its adapter disabled
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g), "pooled_projections": torch.randn(2, 16, generator=g)}
    loss = obj.pair_loss(obj.model, x[[0, 2]], x[[1, 3]], cond, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    grads = {n: p.grad for n, p in obj.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    t = torch.rand(2)
    c = cond
    with torch.no_grad():
        ref = obj.ref_velocity(obj.model, x[:2], t, c)
        assert torch.allclose(ref, DiffusersVelocity(fresh)(x[:2], t, **c), atol=1e-5)
    write_run(tmp_path / "run", obj.model, {"align": {"method": "dpo"}})
    assert (tmp_path / "run" / "adapter.safetensors").is_file() and (tmp_path / "run" / "align.json").is_file()
    back = load_adapter(tmp_path / "run", DiffusersVelocity(fresh))
    with torch.no_grad():
        assert torch.allclose(back(x[:2], t, **c), policy(x[:2], t, **c), atol=1e-5)
    assert set(adapter_state(back)) == set(adapter_state(policy))
