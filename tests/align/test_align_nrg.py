"""Flow-NRG: reward guidance on noisy samples, with per-objective weights (closed form on a Gaussian)."""
from __future__ import annotations

import pytest
import torch

from straightflow.control.nrg import NoisyReward, WeightedRewards, guidance_coefficient, nrg, train_noisy_reward
from straightflow.control.scaling import METHODS, search
from straightflow.oracle import GaussianMixtureFlow

MU, S = torch.tensor([[1.0, -0.5]]), 0.5


def _flow():
    return GaussianMixtureFlow(MU, stds=torch.tensor([S]))


def test_guidance_tilts_a_gaussian_exactly():
    """Target N(mu, s^2 I), reward r = w . x: p exp(r) = N(mu + s^2 w, s^2 I); Flow-NRG with E[r | x_t] reaches it."""
    assert "nrg" in METHODS
    w = torch.tensor([1.0, 2.0])
    res = search(_flow(), lambda x: x @ w.to(x.dtype), (2,), 200, "nrg", n=3000, seed=0, t_min=1e-3)
    assert res.nfe == 200 and res.info["steps"] == 100  # a clean reward costs 2 NFE per step (VJP through x1_hat)
    assert torch.allclose(res.x.mean(0), MU[0] + S * S * w, atol=0.03)
    assert torch.allclose(res.x.std(0), torch.full((2,), S), atol=0.03)
    assert guidance_coefficient("linear", 0.25) == pytest.approx(3.0)


def test_weights_combine_objectives_linearly():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    ra, rb = (lambda x: x @ a.to(x.dtype)), (lambda x: x @ b.to(x.dtype))
    both = nrg(_flow(), [ra, rb], (2,), 40, n=64, weights=[0.5, -1.0], seed=1)
    one = nrg(_flow(), lambda x: x @ (0.5 * a - b).to(x.dtype), (2,), 40, n=64, seed=1)
    assert torch.allclose(both.x, one.x, atol=1e-5)
    assert "0.5*" in WeightedRewards([ra, rb], [0.5, -1.0]).name
    with pytest.raises(ValueError, match="one weight per reward"):
        WeightedRewards([ra, rb], [1.0])
    with pytest.raises(ValueError, match="cannot pay"):
        nrg(_flow(), ra, (2,), 1, n=2)
    vp = nrg(_flow(), ra, (2,), 10, n=2, vp=True)  # guided on the VP conversion of the same marginals
    assert vp.info["vp"] and vp.nfe <= 10


def test_noisy_reward_model_guides_at_one_nfe_per_step():
    w = torch.tensor([1.0, 2.0])
    x1 = _flow().sample(4000, generator=torch.Generator().manual_seed(0)).float()
    net = train_noisy_reward(lambda x: x @ w, x1, steps=400, seed=0)
    assert isinstance(net, NoisyReward) and net.noisy
    # at t = 1 the noisy reward is the clean one
    assert torch.allclose(net(x1[:200], 1.0), x1[:200] @ w, atol=0.3)
    res = nrg(_flow(), net, (2,), 100, n=2000, seed=2)
    assert res.nfe == 100 and res.info["noisy"]
    assert torch.allclose(res.x.mean(0).double(), (MU[0] + S * S * w).double(), atol=0.12)
    with pytest.raises(ValueError, match="vp=True"):
        nrg(_flow(), net, (2,), 10, n=2, vp=True)
