"""Weighted CFM (entropic Gibbs weights) and blockwise flow matching (one network per time segment)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import straightflow as sf
from straightflow.checkpoint import load_weights, save_model
from straightflow.models import MLP, build_model
from straightflow.models.blockwise import BlockwiseFlow, block_boundaries
from straightflow.straighten.wcfm import WeightedCFM, gibbs_weights

SUB = {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "time_dim": 8}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- W-CFM


def test_gibbs_weights_closed_form():
    x0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, -1.0]])
    x1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    c_sum = torch.tensor([0.0, 2.0, 8.0])
    torch.testing.assert_close(gibbs_weights(x0, x1, 2.0, cost="sum"), torch.exp(-c_sum / 2.0))
    torch.testing.assert_close(gibbs_weights(x0, x1, 2.0, cost="mean"), torch.exp(-c_sum / 2 / 2.0))
    assert torch.equal(gibbs_weights(x0, x1, math.inf), torch.ones(3))


@pytest.mark.parametrize("normalize", ["batch", "none"])
def test_wcfm_infinite_epsilon_is_plain_cfm_exactly(normalize):
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=16, depth=1)
    torch.nn.init.normal_(model.out.weight, std=0.1)  # non-zero output so the loss depends on the model
    x1 = sf.data.toy_2d("moons", 64, seed=1)
    plain = sf.Flow(model).loss(x1, generator=_gen(3))
    w = WeightedCFM(model, epsilon=math.inf, normalize=normalize).loss(x1, generator=_gen(3))
    assert torch.equal(plain, w)  # same draws, weights exactly 1
    # a huge finite epsilon converges to it
    big = WeightedCFM(model, epsilon=1e12, normalize=normalize).loss(x1, generator=_gen(3))
    torch.testing.assert_close(big, plain, rtol=1e-6, atol=0)


def test_wcfm_weights_favour_short_pairs_and_gradient_is_finite():
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=16, depth=1)
    torch.nn.init.normal_(model.out.weight, std=0.1)
    obj = WeightedCFM(model, epsilon=0.5)
    x0 = torch.randn(32, 2, generator=_gen(1))
    x1 = x0 + torch.linspace(0, 3, 32)[:, None]  # increasing pair distance
    w = obj.weights(x0, x1)
    assert torch.all(w[1:] < w[:-1]) and torch.allclose(w.mean(), torch.tensor(1.0))
    # tiny epsilon: no underflow to an all-zero loss thanks to the log-space normalisation
    tiny = WeightedCFM(model, epsilon=1e-6).weights(x0, x1)
    assert torch.isfinite(tiny).all() and tiny.sum() > 0
    loss = obj.loss(sf.data.toy_2d("moons", 128, seed=2), generator=_gen(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_wcfm_loss_matches_hand_weighted_average():
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=16, depth=1)
    torch.nn.init.normal_(model.out.weight, std=0.1)
    x1 = sf.data.toy_2d("moons", 16, seed=4)
    x0 = torch.randn(16, 2, generator=_gen(5))
    obj = WeightedCFM(model, epsilon=0.7, normalize="none", coupling="pairs")
    g = _gen(9)
    got = obj.loss(x1, x0=x0, generator=g)
    t = obj.time_dist.sample(16, generator=_gen(9))
    xt, ut = obj.path.interpolate(x0, x1, t)
    per = (model(xt, t) - ut).pow(2).mean(1)
    w = torch.exp(-(x0 - x1).pow(2).sum(1) / 2 / 0.7)
    torch.testing.assert_close(got, (w * per).mean())


def test_wcfm_config_round_trip_and_errors():
    model = MLP(dim=2, hidden=8, depth=1)
    obj = WeightedCFM(model, epsilon=0.25, time_dist="logit_normal", cost="sum", normalize="none")
    cfg = json.loads(json.dumps(obj.config()))
    again = WeightedCFM(model, **cfg)
    assert again.config() == cfg and cfg["objective"] == "wcfm"
    inf_cfg = json.loads(json.dumps(WeightedCFM(model, epsilon=math.inf).config()))
    assert math.isinf(WeightedCFM(model, **inf_cfg).epsilon)
    for bad in (dict(epsilon=0.0), dict(epsilon=-1.0), dict(epsilon=float("nan")), dict(cost="l1"),
                dict(normalize="max"), dict(objective="flow")):
        with pytest.raises(ValueError):
            WeightedCFM(model, **bad)


def test_wcfm_trains_a_tiny_2d_model_with_straighter_paths_than_cfm():
    x = sf.data.toy_2d("8gaussians", 4000, seed=0)
    ref = sf.data.toy_2d("8gaussians", 1000, seed=11)
    z = torch.randn(1000, 2, generator=_gen(7))
    res = {}
    for eps in (math.inf, 1.0):  # inf = plain CFM with the same draws
        torch.manual_seed(0)
        run = sf.train(WeightedCFM(MLP(dim=2, hidden=64, depth=2), epsilon=eps), x, steps=400, batch_size=256,
                       lr=3e-3, ema_decay=0.99, progress=False, seed=0)
        r = sf.sample(run.model, z, solver="euler", steps=20, return_trajectory=True)
        res[eps] = (sf.metrics.w2(r.x, ref), sf.metrics.straightness(r.trajectory, r.times))
    untrained = sf.metrics.w2(z, ref)
    assert res[1.0][0] < 0.5 * untrained and res[math.inf][0] < 0.5 * untrained
    # the Gibbs weights favour short pairs: much straighter sampling paths than plain CFM
    assert res[1.0][1] < 0.25 * res[math.inf][1], res


# ----------------------------------------------------------------------------- blockwise


def test_block_boundaries_and_errors():
    assert block_boundaries(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert block_boundaries(2, [0, 0.3, 1]) == [0.0, 0.3, 1.0]
    for args in ((0, None), (2, [0, 1]), (2, [0.1, 0.5, 1]), (2, [0, 0.6, 0.9]), (3, [0, 0.5, 0.4, 1])):
        with pytest.raises(ValueError):
            block_boundaries(*args)
    with pytest.raises(ValueError):
        BlockwiseFlow({"dim": 2}, 2)


def test_blockwise_routes_rows_to_their_segment():
    torch.manual_seed(0)
    m = BlockwiseFlow(SUB, num_blocks=4)
    for blk in m.blocks:
        torch.nn.init.normal_(blk.out.weight, std=0.5)
    seen = {k: [] for k in range(4)}
    for k, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, args, out, k=k: seen[k].append(args[1].detach().clone()))
    t = torch.tensor([0.0, 0.1, 0.24999, 0.25, 0.3, 0.5, 0.74, 0.75, 0.9, 1.0, 0.6, 0.05])
    x = torch.randn(t.shape[0], 2)
    v = m(x, t)
    lo, hi = [0.0, 0.25, 0.5, 0.75], [0.25, 0.5, 0.75, 1.0]
    for k in range(4):
        ts = torch.cat(seen[k])
        assert torch.all(ts >= lo[k]) and (torch.all(ts < hi[k]) or k == 3)
        mask = (t >= lo[k]) & ((t < hi[k]) if k < 3 else (t <= 1.0))
        assert ts.numel() == int(mask.sum())
        # the same output as calling the block directly on its rows
        torch.testing.assert_close(v[mask], m.blocks[k](x[mask], t[mask]))
    # a scalar time goes to one block only
    seen = {k: [] for k in range(4)}
    v = m(x, 0.6)
    assert [len(seen[k]) for k in range(4)] == [0, 0, 1, 0]
    torch.testing.assert_close(v, m.blocks[2](x, torch.full((x.shape[0],), 0.6)))


def test_blockwise_conditioning_is_split_with_rows():
    torch.manual_seed(0)
    sub = dict(SUB, num_classes=3)
    m = BlockwiseFlow(sub, num_blocks=2, boundaries=[0.0, 0.4, 1.0])
    assert m.num_classes == 3 and m.null_class == 3 and m.sample_shape == (2,)
    for blk in m.blocks:
        torch.nn.init.normal_(blk.out.weight, std=0.5)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    t = torch.tensor([0.1, 0.9, 0.39, 0.4, 0.8, 0.0])
    v = m(x, t, y=y)
    low = t < 0.4
    torch.testing.assert_close(v[low], m.blocks[0](x[low], t[low], y=y[low]))
    torch.testing.assert_close(v[~low], m.blocks[1](x[~low], t[~low], y=y[~low]))


def test_blockwise_gradients_are_isolated_between_blocks():
    torch.manual_seed(0)
    m = BlockwiseFlow(SUB, num_blocks=3)
    x, t = torch.randn(8, 2), torch.full((8,), 0.5)  # all rows in block 1
    (m(x, t) - 1.0).pow(2).sum().backward()
    for k, blk in enumerate(m.blocks):
        total = sum(float(p.grad.abs().sum()) for p in blk.parameters() if p.grad is not None)
        assert (total > 0) == (k == 1), (k, total)
    # a flow-matching step on mixed times only moves the blocks whose segment was sampled
    m.zero_grad()
    before = [torch.cat([p.detach().flatten().clone() for p in b.parameters()]) for b in m.blocks]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    t = torch.tensor([0.1, 0.2, 0.9, 0.95])
    xt = torch.randn(4, 2)
    (m(xt, t) - 1.0).pow(2).mean().backward()
    opt.step()
    after = [torch.cat([p.detach().flatten() for p in b.parameters()]) for b in m.blocks]
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[2], after[2])
    assert torch.equal(before[1], after[1])


def test_blockwise_config_rebuild_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = BlockwiseFlow(SUB, num_blocks=2, boundaries=[0.0, 0.3, 1.0])
    cfg = json.loads(json.dumps(m.config))
    assert cfg["name"] == "blockwise" and cfg["block"]["name"] == "mlp" and cfg["num_blocks"] == 2
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    again = BlockwiseFlow(**kwargs)
    assert again.config == m.config and again.boundaries == [0.0, 0.3, 1.0]
    save_model(tmp_path / "run", m)
    load_weights(again, tmp_path / "run" / "model.safetensors")
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(again(x, t), m(x, t))
    from straightflow.models import MODELS

    if "blockwise" in MODELS.names():  # once the lead registers it, build_model rebuilds it too
        assert isinstance(build_model(cfg), BlockwiseFlow)


def test_blockwise_trains_with_flow_and_samples():
    torch.manual_seed(0)
    x = sf.data.toy_2d("moons", 4000, seed=0)
    m = BlockwiseFlow(dict(SUB, hidden=32), num_blocks=2)
    run = sf.train(sf.Flow(m), x, steps=250, batch_size=256, lr=3e-3, progress=False, seed=0)
    losses = [v for _, v in run.history]
    assert losses[-1] < losses[0]
    r = sf.sample(run.model, torch.randn(500, 2, generator=_gen(1)), solver="euler", steps=8)
    assert r.nfe == 8 and torch.isfinite(r.x).all()
