"""Alignment objectives: gradients against finite differences / closed forms, the no-op and zero-KL
properties, the SDE conventions, bad input, and resume after a kill (tiny models, seconds)."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import straightflow as sf
from straightflow.align import METHODS, RewardError, align, available
from straightflow.align.adjoint_matching import AdjointMatching, lean_adjoint
from straightflow.align.dpo import FlowDPO
from straightflow.align.draft import DRaFT
from straightflow.align.grpo import FlowGRPO
from straightflow.align.prefs import PreferenceError, as_preferences, load_preferences, save_preferences
from straightflow.align.reinflow import ReinFlow
from straightflow.align.rwr import FlowRWR, FlowSFT, rwr_weights
from straightflow.align.sde import (gaussian_kl, gaussian_logp, grpo_sigma, memoryless_drift, memoryless_sigma,
                                    sde_mean)
from straightflow.models import MLP
from straightflow.registry import UnknownNameError
from straightflow.train import STATE_FILE, read_train_state

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _mlp(seed=0, dim=2):
    torch.manual_seed(seed)
    m = MLP(dim=dim, hidden=16, depth=1, time_dim=8)
    with torch.no_grad():  # a non-zero velocity (the output layer starts at zero)
        m.out.weight.normal_(0, 0.3)
        m.out.bias.normal_(0, 0.3)
    return m


class Affine(nn.Module):
    """v(x, t) = w * x + b(t) with scalar parameters (1-D): closed forms are easy."""

    def __init__(self, w=0.0, b=0.0, dtype=torch.float64):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w), dtype=dtype))
        self.b = nn.Parameter(torch.tensor(float(b), dtype=dtype))
        self.sample_shape = (1,)

    def forward(self, x, t, **_):
        return self.w * x + self.b


def _fd_check(obj, x1, params, cond=None, eps=1e-6, seed=3):
    """Autograd gradient of obj.loss at fixed generator state vs central finite differences."""
    def loss():
        return obj.loss(x1, cond=cond, generator=torch.Generator().manual_seed(seed))

    for p in params:
        p.grad = None
    loss().backward()
    for p in params:
        g = p.grad.reshape(-1)
        flat = p.data.reshape(-1)
        for i in range(min(3, flat.numel())):
            old = float(flat[i])
            vals = []
            for val in (old + eps, old - eps):
                with torch.no_grad():
                    flat[i] = val
                vals.append(float(loss().detach()))
            with torch.no_grad():
                flat[i] = old
            up, dn = vals
            assert abs((up - dn) / (2 * eps) - float(g[i])) <= 1e-5 * max(1.0, abs(float(g[i]))), (p.shape, i)


def _prefs(n=6, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, dim, generator=g, dtype=torch.float64)
    pairs = [{"id": i, "chosen": 2 * i, "rejected": 2 * i + 1} for i in range(n)]
    r = torch.randn(2 * n, generator=g, dtype=torch.float64)
    return as_preferences(x, torch.arange(2 * n), pairs, reward=r)


# ----------------------------------------------------------------------------- registry + conventions
def test_registry_names_and_unknown_method():
    assert available() == ["adjoint_matching", "dpo", "draft", "grpo", "reinflow", "rwr", "sft"]
    assert METHODS.get("flow-dpo") is FlowDPO and METHODS.get("am") is AdjointMatching
    with pytest.raises(UnknownNameError, match="valid names: adjoint_matching, dpo, draft"):
        align(_mlp(), method="ppo", reward="region:disc:0,0,1", steps=1, progress=False)
    from straightflow.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["align", "run", "--method", "nope", "--out", "x"])
    a = build_parser().parse_args(["align", "run", "--method", "grpo", "--out", "x"])
    assert a.method == "grpo"


def test_flow_grpo_step_in_authors_convention_equals_ours():
    """Flow-GRPO's SDE step written in the noise-level convention (sigma = 1 - t, model output = noise - data,
    dt < 0) is the Euler-Maruyama step of our marginal-preserving SDE with g = a sqrt((1 - t) / t)."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a, t, h = 0.7, 0.3, 0.1
    sig, sig_next, out = 1 - t, 1 - t - h, -v  # their sigma, sigma_prev and model output
    dt = sig_next - sig
    std = a * math.sqrt(sig / (1 - sig))
    theirs = x * (1 + std ** 2 / (2 * sig) * dt) + out * (1 + std ** 2 * (1 - sig) / (2 * sig)) * dt
    ours = sde_mean(x, v, t, h, grpo_sigma(t, a))
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert grpo_sigma(t, a) == pytest.approx(std)
    # at t = 0 the denominator is floored at the first grid time, as the authors floor sigma = 1
    assert grpo_sigma(0.0, a, t_floor=0.1) == pytest.approx(a * math.sqrt(1 / 0.1))


def test_memoryless_schedule_and_drift_on_the_linear_path():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    for t in (0.2, 0.5, 0.9):
        assert memoryless_sigma(t) == pytest.approx(math.sqrt(2 * (1 - t) / t))
        assert torch.allclose(memoryless_drift(x, v, t), 2 * v - x / t, atol=1e-12)
        # the Euler-Maruyama mean with the memoryless g has that drift
        assert torch.allclose((sde_mean(x, v, t, 1e-3, memoryless_sigma(t)) - x) / 1e-3, 2 * v - x / t, atol=1e-9)
    assert torch.allclose(memoryless_drift(x, v, 1.0), 2 * v - x, atol=1e-12)  # finite at t = 1


def test_gaussian_logp_and_kl_closed_forms():
    x, m = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ref = torch.distributions.Normal(m, 0.3).log_prob(x).sum()
    assert float(gaussian_logp(x, m, 0.3)) == pytest.approx(float(ref))
    assert float(gaussian_kl(x, m, 0.3)) == pytest.approx(float((x ** 2).sum() / (2 * 0.09)))


# ----------------------------------------------------------------------------- gradients
def test_rwr_sft_dpo_gradients_match_finite_differences():
    torch.manual_seed(0)
    m = _mlp(1).double()
    prefs = _prefs()
    for cls, extra in ((FlowRWR, {}), (FlowSFT, {"reg": 0.5}), (FlowDPO, {"reg": 50.0})):
        obj = cls(m, preferences=prefs, **extra)
        data = obj.make_data(m, (2,), None, 6, 0, None)
        _fd_check(obj, data.x[:6].double(), [obj.model.policy.out.weight, obj.model.policy.inp.bias])


def test_draft_gradient_matches_finite_differences_and_adjoint():
    torch.manual_seed(0)
    m = _mlp(2).double()
    reward = sf.control.rewards.RegionReward("disc", center=(1.0, 0.0), radius=1.0, temperature=0.5)
    obj = DRaFT(m, reward=reward, sample_steps=3, truncate=3, reg=0.1)
    x1 = torch.zeros(4, 2, dtype=torch.float64)
    _fd_check(obj, x1, [obj.model.policy.out.weight])
    # truncate=0 back-propagates through every step with the adjoint of control/adjoint.py
    full = DRaFT(m, reward=reward, sample_steps=40, truncate=40)
    adj = DRaFT(m, reward=reward, sample_steps=40, truncate=0)
    grads = []
    for o in (full, adj):
        o.model.zero_grad()
        o.loss(x1, generator=torch.Generator().manual_seed(1)).backward()
        grads.append(o.model.policy.out.weight.grad.clone())
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 0.05  # equal up to the solver's error (O(h))


def test_grpo_policy_gradient_matches_closed_form():
    """One SDE step from t = 0 to 1 with v = b: x1 = x0 (1 - a^2/2) + b + a z, r(x1) = x1. The group-normalised
    policy gradient is d E[r] / db / std(r) = 1 / sqrt((1 - a^2/2)^2 + a^2)."""
    m = Affine()
    a = 0.7
    obj = FlowGRPO(m, reward=lambda x: x[:, 0], group=20000, sde_steps=1, noise_level=a, reg=0.0)
    loss = obj.loss(torch.zeros(1, 1, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    loss.backward()
    expect = 1 / math.sqrt((1 - a * a / 2) ** 2 + a * a)
    assert -float(m.b.grad) == pytest.approx(expect, rel=0.03)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-9)  # on-policy: ratio 1, advantages of mean 0


def test_reinflow_policy_gradient_matches_closed_form():
    """K = 1: x1 = x0 + b + sigma z with a fixed noise scale; the group-normalised policy gradient in b is
    d E[r] / db / std(r) = 1 / sqrt(1 + sigma^2)."""
    m = Affine()
    obj = ReinFlow(m, reward=lambda x: x[:, 0], group=20000, denoise_steps=1, min_std=0.8, max_std=0.8, reg=0.0)
    obj.model.double()
    obj.loss(torch.zeros(1, 1, dtype=torch.float64), generator=torch.Generator().manual_seed(0)).backward()
    assert -float(m.b.grad) == pytest.approx(1 / math.sqrt(1 + 0.64), rel=0.03)


def test_lean_adjoint_matches_closed_form_for_a_linear_base():
    """v = w x: base drift b = (2 w - 1/t) x, so a(t) = a(1) exp(int_t^1 (2 w - 1/s) ds) = a(1) t e^{2w(1-t)}."""
    w = 0.3
    K = 4000
    ts = [i / K for i in range(K + 1)]
    xs = [torch.ones(2, 1, dtype=torch.float64) for _ in ts]
    a1 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    adj = lean_adjoint(lambda x, t, c: w * x, xs, ts, a1, {})
    for k in (K // 4, K // 2, 3 * K // 4):
        t = ts[k]
        assert torch.allclose(adj[k], a1 * t * math.exp(2 * w * (1 - t)), rtol=2e-3)


def test_adjoint_matching_is_stationary_at_the_exact_tilt():
    """Base N(0, 1) (v = -... exact Gaussian flow), reward r = c x, lambda = 1: the target is N(c, 1), whose flow
    velocity is v* = (x + ... ) -- at the optimum the lean-adjoint regression residual has zero mean."""
    # For a standard normal base on the linear path, v_base(x, t) = (2t - 1) x / (t^2 + (1 - t)^2);
    # the tilt by exp(c x) shifts the target to N(c, 1): v*(x, t) = v_base(x - c t, t) + c.
    c = 0.5

    class Gauss(nn.Module):
        def __init__(self, shift=0.0):
            super().__init__()
            self.shift = nn.Parameter(torch.tensor(float(shift), dtype=torch.float64))
            self.sample_shape = (1,)

        def forward(self, x, t, **_):
            tt = t.reshape(-1, 1).to(x.dtype)
            y = x - self.shift * tt
            return (2 * tt - 1) * y / (tt ** 2 + (1 - tt) ** 2) + self.shift

    base = Gauss(0.0).requires_grad_(False)
    grads = {}
    for shift in (0.0, c, 2 * c):
        obj = AdjointMatching(Gauss(shift), reward=lambda x: c * x[:, 0], reg=1.0, sde_steps=200, reference=base)
        obj.model.zero_grad()
        obj.loss(torch.zeros(4000, 1, dtype=torch.float64), generator=torch.Generator().manual_seed(0)).backward()
        grads[shift] = float(obj.model.policy.shift.grad)
    # the loss decreases towards the exact tilt and is stationary there (up to discretisation + MC error)
    assert grads[0.0] < 0 < grads[2 * c]
    assert abs(grads[c]) < 0.15 * abs(grads[0.0])


# ----------------------------------------------------------------------------- invariants
def test_dpo_with_identical_chosen_and_rejected_is_a_no_op():
    m = _mlp(3).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    prefs = as_preferences(x, torch.arange(4), [{"id": i, "chosen": i, "rejected": i} for i in range(4)])
    obj = FlowDPO(m, preferences=prefs, reg=1000.0)
    data = obj.make_data(m, (2,), None, 4, 0, None)
    loss = obj.loss(data.x.double(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-12)
    # zero up to float64 round-off in the batched backward (chosen and rejected rows cancel)
    assert all(float(p.grad.abs().max()) < 1e-13 for p in obj.model.parameters() if p.grad is not None)


@pytest.mark.parametrize("cls,opts", [(FlowGRPO, {"group": 4, "sde_steps": 3}),
                                      (ReinFlow, {"group": 4, "denoise_steps": 2})])
def test_kl_term_is_zero_at_the_base_model(cls, opts):
    reward = sf.control.rewards.RegionReward("disc", center=(1.0, 0.0), radius=1.0)
    out = []
    for reg in (0.0, 5.0):
        m = _mlp(4)
        obj = cls(m, reward=reward, reg=reg, **opts)
        loss = obj.loss(torch.zeros(2, 2), generator=torch.Generator().manual_seed(0))
        loss.backward()
        out.append((float(loss.detach()), [p.grad.clone() for p in obj.model.policy.parameters()]))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-7)
    for g0, g1 in zip(out[0][1], out[1][1]):
        assert torch.allclose(g0, g1, atol=1e-7)


def test_rwr_weights_are_normalised_boltzmann():
    r = torch.tensor([0.0, 1.0, 2.0])
    w = rwr_weights(r, 1.0)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[2] / w[1]) == pytest.approx(math.e)


# ----------------------------------------------------------------------------- bad input
def test_bad_rewards_fail_before_training(tmp_path):
    m = _mlp(5)
    with pytest.raises(RewardError, match="NaN/Inf"):
        align(m, method="grpo", reward=lambda x: x[:, 0] * float("nan"), out=tmp_path / "a", steps=2, progress=False)
    assert not (tmp_path / "a").exists()  # raised before any work
    with pytest.raises(RewardError, match=r"returned shape \(4, 2\).*expected \(4,\)"):
        align(m, method="grpo", reward=lambda x: x, steps=2, progress=False)
    with pytest.raises(RewardError, match="no gradient"):
        align(m, method="draft", reward="region:disc:0,0,1:hard", steps=2, progress=False)
    with pytest.raises(RewardError, match="no gradient"):
        align(m, method="adjoint_matching", reward=lambda x: torch.from_numpy(x.detach().numpy()[:, 0]),
              steps=2, progress=False)
    # a reward that turns bad during training is caught at that step, with the reason
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        return x[:, 0] * (float("nan") if calls["n"] > 3 else 1.0)

    with pytest.raises(RewardError, match="NaN/Inf"):
        align(m, method="grpo", reward=flaky, steps=5, progress=False, batch_size=2, group=2, sde_steps=2)


def test_preference_files_missing_and_duplicated_ids(tmp_path):
    prefs = _prefs(n=3)
    save_preferences(prefs, tmp_path / "ok")
    back = load_preferences(tmp_path / "ok")
    assert torch.equal(back.chosen_x(), prefs.chosen_x().float()) and back.pair_ids == [0, 1, 2]
    x, ids = prefs.x, prefs.ids
    with pytest.raises(PreferenceError, match=r"not in the samples file.*chosen=99"):
        as_preferences(x, ids, [{"id": 0, "chosen": 99, "rejected": 1}])
    with pytest.raises(PreferenceError, match="duplicated sample ids \\[1\\]"):
        as_preferences(x, torch.tensor([0, 1, 1, 3, 4, 5]), [{"id": 0, "chosen": 0, "rejected": 1}])
    with pytest.raises(PreferenceError, match="duplicated pair id 7"):
        as_preferences(x, ids, [{"id": 7, "chosen": 0, "rejected": 1}, {"id": 7, "chosen": 2, "rejected": 3}])
    with pytest.raises(PreferenceError, match="has no 'rejected'"):
        as_preferences(x, ids, [{"id": 0, "chosen": 0}])
    (tmp_path / "ok" / "pairs.jsonl").write_text('{"id": 0, "chosen": 0, "rejected": 1}\nnot json\n')
    with pytest.raises(PreferenceError, match="line 2: not valid JSON"):
        load_preferences(tmp_path / "ok")
    sf.io.save_tensors(tmp_path / "bad.safetensors", {"x": x.float()})
    with pytest.raises(PreferenceError, match="no 'id' tensor"):
        load_preferences(tmp_path / "bad.safetensors", tmp_path / "ok" / "pairs.jsonl")


# ----------------------------------------------------------------------------- runs
def test_aligned_run_is_a_normal_run(tmp_path):
    base = tmp_path / "base"
    sf.save_model(base, _mlp(6), {"flow": sf.Flow(_mlp(6)).config(), "data": {"name": "8gaussians", "shape": [2]},
                                  "data_source": "8gaussians"})
    res = align(str(base), method="dpo", reward="region:disc:1,0,1", out=tmp_path / "al", steps=3, n_data=16,
                batch_size=8, progress=False, lr=1e-3)
    loaded = sf.load(tmp_path / "al")
    assert loaded.run_config["align"]["method"] == "dpo" and loaded.run_config["data"]["shape"] == [2]
    x = torch.randn(5, 2)
    t = torch.rand(5)
    assert torch.equal(loaded(x, t), res.model(x, t))
    assert (tmp_path / "al" / "preferences" / "pairs.jsonl").is_file()
    from straightflow.cli import main

    assert main(["sample", str(tmp_path / "al"), "--n", "8", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0


def test_resume_after_sigkill_is_exact(tmp_path):
    base = tmp_path / "base"
    sf.save_model(base, _mlp(7), {"data": {"name": "toy", "shape": [2]}})
    kw = dict(method="grpo", reward="region:disc:1,0,1", steps=6, batch_size=2, group=3, sde_steps=3, ckpt_every=2,
              ema=0.9, lr=1e-3, progress=False, seed=3)
    reference = align(str(base), out=tmp_path / "ref", **kw)
    out = tmp_path / "victim"
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        torch.set_num_threads({torch.get_num_threads()})
        import straightflow as sf
        from straightflow.align import align
        m = sf.load({str(base)!r})
        m.register_forward_pre_hook(lambda mod, args: time.sleep(0.02))  # slow, numerics unchanged
        align(m, out=sys.argv[1], **{kw!r})
    """))
    proc = subprocess.Popen([PY, str(script), str(out)], cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (out / STATE_FILE).exists():
            if proc.poll() is not None:
                pytest.fail(f"victim exited early: {proc.stdout.read().decode()[-2000:]}")
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, meta = read_train_state(out / STATE_FILE)
    assert 0 < meta["step"] < 6
    res = align(str(base), out=out, **kw)
    for a, b in zip(res.module.state_dict().values(), reference.module.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(sf.load(out).state_dict().values(),
                                                 sf.load(tmp_path / "ref").state_dict().values()))
    assert res.history == reference.history
