"""Adjoint gradients through sampling: agreement with backprop, constant memory, noise optimisation."""
import pytest
import torch

from benchmarks.adjoint import SavedTensorMeter
from straightflow.control.adjoint import (SoftLabelModel, adjoint_gradients, odeint_adjoint, odeint_unrolled,
                                          optimise_noise)
from straightflow.control.rewards import RegionReward
from straightflow.models import build_model
from straightflow.oracle import GaussianMixtureFlow


@pytest.fixture(scope="module")
def soft_model():
    torch.manual_seed(0)
    m = build_model({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2, "num_classes": 3}).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return SoftLabelModel(m)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 2, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(8, 4, generator=g, dtype=torch.float64), -1)
    return x0, w


def _loss(x):
    return (x ** 2).sum(1) + x[:, 0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("solver,steps,tol", [("rk4", 20, 1e-3), ("heun", 40, 5e-3), ("euler", 200, 3e-2)])
def test_adjoint_matches_backprop(soft_model, solver, steps, tol):
    x0, w = _inputs()
    ga = adjoint_gradients(soft_model, _loss, x0, steps, solver, cond={"label_weights": w})
    gb = adjoint_gradients(soft_model, _loss, x0, steps, solver, cond={"label_weights": w}, method="backprop")
    assert ga["loss"] == pytest.approx(gb["loss"], rel=1e-12)  # same forward solve
    assert _rel(ga["x0"], gb["x0"]) < tol
    assert _rel(ga["cond"]["label_weights"], gb["cond"]["label_weights"]) < tol
    pa = torch.cat([p.reshape(-1) for p in ga["params"]])
    pb = torch.cat([p.reshape(-1) for p in gb["params"]])
    assert pb.norm() > 0 and _rel(pa, pb) < tol


def test_euler_adjoint_error_falls_like_h(soft_model):
    x0, w = _inputs()
    errs = []
    for steps in (20, 80):
        ga = adjoint_gradients(soft_model, _loss, x0, steps, "euler", cond={"label_weights": w})
        gb = adjoint_gradients(soft_model, _loss, x0, steps, "euler", cond={"label_weights": w}, method="backprop")
        errs.append(_rel(ga["x0"], gb["x0"]))
    assert 2.5 < errs[0] / errs[1] < 6.5  # first order: 4x the steps, ~4x smaller error


def test_adjoint_composes_with_autograd_and_forward_matches(soft_model):
    x0, w = _inputs()
    soft_model.zero_grad(set_to_none=True)
    z = x0.clone().requires_grad_(True)
    x1 = odeint_adjoint(soft_model, z, 10, "rk4", cond={"label_weights": w}, params=[])
    torch.testing.assert_close(x1, odeint_unrolled(soft_model, x0, 10, "rk4", cond={"label_weights": w}).detach())
    (2 * x1.sin()).sum().backward()
    assert all(p.grad is None for p in soft_model.parameters())  # params=[]: weights untouched
    z2 = x0.clone().requires_grad_(True)
    (2 * odeint_unrolled(soft_model, z2, 10, "rk4", cond={"label_weights": w}).sin()).sum().backward()
    assert _rel(z.grad, z2.grad) < 1e-3
    soft_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="rk4"):
        odeint_adjoint(soft_model, x0, 4, "dopri5")


def test_adjoint_memory_is_constant_in_steps(soft_model):
    x0, w = _inputs()
    peaks = {}
    for method in ("adjoint", "backprop"):
        for steps in (5, 20):
            with SavedTensorMeter() as m:
                adjoint_gradients(soft_model, _loss, x0, steps, "rk4", cond={"label_weights": w}, method=method)
            peaks[method, steps] = m.peak
    assert peaks["adjoint", 20] == peaks["adjoint", 5]
    assert peaks["backprop", 20] > 3 * peaks["backprop", 5] / 1.3
    assert peaks["backprop", 20] > 5 * peaks["adjoint", 20]


def test_soft_label_model_matches_integer_labels(soft_model):
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    torch.testing.assert_close(soft_model(x, t, label_weights=soft_model.one_hot(y, torch.float64)),
                               soft_model.model(x, t, y=y))
    with pytest.raises(ValueError, match="label_weights"):
        soft_model(x, t, label_weights=torch.zeros(5, 3))


def test_optimise_noise_increases_reward():
    o = GaussianMixtureFlow.eight_gaussians()
    reward = RegionReward("disc", center=(2.4, 0.0), radius=0.3, temperature=0.3)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = optimise_noise(o, reward, x0, steps=8, iters=20, lr=0.2, solver="euler")
    assert res.history[-1] > res.history[0] + 0.2
    assert res.nfe == 8 * (2 * 20 + 1)
    assert res.x1.shape == x0.shape


@pytest.mark.slow
def test_bench_adjoint_quick(tmp_path):
    from benchmarks.adjoint import bench_adjoint

    md = bench_adjoint(str(tmp_path), quick=True)
    assert "| rk4 | 8 |" in md and (tmp_path / "adjoint_memory.png").exists()
