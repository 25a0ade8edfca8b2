"""Flow policies on gymnasium's Pendulum: expert data, behaviour cloning, ReinFlow-PPO with exact resume (tiny)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="flow policies need gymnasium (pip install 'straightflow[align]')")

import straightflow as sf  # noqa: E402
from straightflow.align.policy import (ObsMLP, ReinFlowPPO, act, behaviour_clone, evaluate, expert_data,  # noqa: E402
                                       pendulum_expert, reinflow_finetune)


def test_expert_bc_and_evaluation_smoke(tmp_path):
    obs, a, ret = expert_data(episodes=1, seed=0)
    assert obs.shape == (200, 3) and a.shape == (200, 1) and float(a.abs().max()) <= 1.0 and ret < 0
    assert np.allclose(pendulum_expert(np.array([[1.0, 0.0, 0.0]])), 0.0)  # upright and still: no torque
    res, info = behaviour_clone(out=tmp_path / "bc", steps=5, episodes=1, hidden=16, depth=1, progress=False)
    pol = sf.load(tmp_path / "bc")  # a normal run (the obs_mlp model is registered by straightflow.align)
    assert isinstance(pol, ObsMLP) and pol.run_config["policy"]["env"] == "Pendulum-v1"
    g = torch.Generator().manual_seed(0)
    out = act(pol, obs[:7], 2, g)
    assert out.shape == (7, 1) and float(out.abs().max()) <= 1.0
    ev = evaluate(pol, episodes=2, steps=1)
    assert ev["episodes"] == 2 and ev["mean"] < 0
    with pytest.raises(ValueError, match="unknown flow-policy environment"):
        expert_data("CartPole-v1", episodes=1)


def test_reinflow_ppo_resume_is_exact(tmp_path, monkeypatch):
    torch.manual_seed(0)
    policy = ObsMLP(1, 3, hidden=16, depth=1)
    kw = dict(rollouts=2, denoise_steps=2, n_envs=2, horizon=20, minibatch=20, epochs=2, ckpt_every=3, progress=False,
              seed=1, reg=0.1, lr=1e-3)
    ref = reinflow_finetune(policy, out=tmp_path / "a", **kw)
    assert ref.steps == 8 and ref.cost["env_steps"] == 2 * 2 * 20

    orig, calls = ReinFlowPPO.loss, {"n": 0}

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("killed")
        return orig(self, *a, **k)

    monkeypatch.setattr(ReinFlowPPO, "loss", boom)
    with pytest.raises(RuntimeError, match="killed"):
        reinflow_finetune(policy, out=tmp_path / "b", **kw)
    monkeypatch.undo()
    res = reinflow_finetune(policy, out=tmp_path / "b", **kw)  # resumes at step 3, mid-rollout
    for (k, a), b in zip(res.module.state_dict().items(), ref.module.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="horizon 500 exceeds"):
        ReinFlowPPO(ObsMLP(1, 3), horizon=500)


def test_reinflow_ppo_probe_checks_the_environment_before_training(tmp_path, monkeypatch):
    """The probe (bad input fails fast) is real: a policy whose sizes do not match the environment is
    refused before any rollout, a matching one passes, and reinflow_finetune runs it first."""
    obj = ReinFlowPPO(ObsMLP(1, 3, hidden=16, depth=1), n_envs=1, horizon=4, minibatch=4)
    obj.probe(ObsMLP(1, 3, hidden=16, depth=1), seed=0)  # Pendulum: observations 3, actions 1
    with pytest.raises(ValueError, match="observations of size 4"):
        obj.probe(ObsMLP(1, 4, hidden=16, depth=1), seed=0)

    collected = []
    monkeypatch.setattr(ReinFlowPPO, "collect", lambda self, m, g: collected.append(1))
    with pytest.raises(ValueError, match="actions of size 2"):
        reinflow_finetune(ObsMLP(2, 3, hidden=16, depth=1), rollouts=1, n_envs=1, horizon=4, minibatch=4,
                          epochs=1, progress=False)
    assert not collected  # refused before the first rollout
