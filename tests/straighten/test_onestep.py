"""One-step models: k-step distillation, SlimFlow, MeanFlow / SplitMeanFlow, conditional straightening."""
from __future__ import annotations

import json
import math

import pytest
import torch

from straightflow import GaussianMixtureFlow, metrics, sample, train
from straightflow.models import MLP, UNet, build_model
from straightflow.straighten.distill import (DistillObjective, SlimFlowObjective, conditional_onestep, distill,
                                             distill_targets, make_pairs, slimflow_distill)
from straightflow.straighten.meanflow import (MeanFlow, SplitMeanFlow, init_from_velocity, meanflow_target,
                                              sample_mean, split_target)


# ----------------------------------------------------------------------------- helpers


class GaussianFlow:
    """Rectified flow N(0, I) -> N(mu, s^2 I) (independent coupling): everything in closed form.

    ``x_t ~ N(t mu, a(t)^2 I)`` with ``a(t)^2 = (1 - t)^2 + t^2 s^2``; the ODE map is
    ``z_r = r mu + a(r) / a(t) (z_t - t mu)``, the velocity ``v = mu + a'(t) / a(t) (z - t mu)`` and the
    average velocity ``u(z, r, t) = (z_r - z) / (r - t)``.
    """

    def __init__(self, mu, s: float) -> None:
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = float(s)
        self.calls = 0

    def a(self, t):
        return torch.sqrt((1 - t) ** 2 + t ** 2 * self.s ** 2)

    def velocity(self, z, t):
        t = t[:, None]
        da_over_a = (t * self.s ** 2 - (1 - t)) / self.a(t) ** 2
        return self.mu + da_over_a * (z - t * self.mu)

    def u(self, z, r, t):
        rr, tt = r[:, None], t[:, None]
        zr = rr * self.mu + self.a(rr) / self.a(tt) * (z - tt * self.mu)
        return (zr - z) / (rr - tt)

    def __call__(self, z, t, r=None):  # model interface of an average-velocity network
        self.calls += 1
        t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0])
        return self.velocity(z, t) if r is None else self.u(z, torch.as_tensor(r, dtype=z.dtype).expand(z.shape[0]), t)


class Float32Oracle:
    """A float64 GaussianMixtureFlow used as a float32 velocity model (optionally class-conditional
    with a null class, for classifier-free guidance)."""

    def __init__(self, oracle: GaussianMixtureFlow, conditional: bool = False) -> None:
        self.oracle = oracle
        self.sample_shape = (oracle.dim,)
        self.num_classes = oracle.n_components if conditional else None
        self.null_class = self.num_classes

    def __call__(self, x, t, y=None):
        t = torch.as_tensor(t).double()
        if y is not None:
            y = torch.where(y == self.null_class, torch.full_like(y, -1), y)  # -1: the unconditional field
        return self.oracle.velocity(x.double(), t, y).float()


def _rand(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _perturb(model):
    """Random weights in the zero-initialised output and interval layers so outputs depend on every input."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("out.", "conv_out.", "interval_embed.embed.mlp.2")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def eight():
    return GaussianMixtureFlow.eight_gaussians()


@pytest.fixture(scope="module")
def eight_pairs(eight):
    return make_pairs(Float32Oracle(eight), 1024, solver="rk4", steps=6, seed=0)


@pytest.fixture(scope="module")
def eight_eval(eight):
    ref = eight.sample(600, torch.Generator().manual_seed(5)).float()
    x0 = torch.randn(600, 2, generator=torch.Generator().manual_seed(7))
    one_rf = sample(Float32Oracle(eight), x0, steps=1).x  # the exact 1-RF at NFE 1
    return ref, x0, metrics.w2(one_rf, ref)


# ----------------------------------------------------------------------------- two-time models


@pytest.mark.parametrize("cfg", [{"name": "mlp", "dim": 2, "hidden": 32, "depth": 2},
                                 {"name": "unet", "in_channels": 1, "resolution": 8, "base_channels": 16,
                                  "num_classes": 10, "attention_resolutions": [4]}])
def test_two_time_models(cfg):
    plain = build_model(cfg)
    mean = build_model({**cfg, "mean_flow": True})
    assert "mean_flow" not in plain.config and "time_scale" not in plain.config and mean.config["mean_flow"] is True
    smooth = build_model({**cfg, "mean_flow": True, "time_scale": 10.0})
    assert smooth.config["time_scale"] == 10.0 and build_model(smooth.config).config == smooth.config
    assert not any(k.startswith("interval_embed") for k in plain.state_dict())
    assert build_model(mean.config).config == mean.config
    # the plain model's keys are a subset: a trained velocity model initialises a MeanFlow model
    init_from_velocity(mean, _perturb(plain))
    _perturb(mean)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, *mean.sample_shape), generator=g)
    t = torch.rand(3, generator=g)
    y = torch.tensor([1, 2, 3]) if mean.num_classes else None
    u = mean(x, t, y, r=t + 0.3)
    assert u.shape == x.shape
    assert not torch.allclose(u, mean(x, t, y, r=t))  # r matters once trained (here: perturbed)
    torch.testing.assert_close(mean(x, t, y), mean(x, t, y, r=t))  # r=None is r=t: a plain velocity
    with pytest.raises(ValueError, match="mean_flow"):
        plain(x, t, y, r=t)
    # at r = t it is used like any velocity model
    out = sample(mean, x, steps=3, cond=None if y is None else {"y": y})
    assert out.nfe == 3 and out.x.shape == x.shape


def test_init_from_velocity_reproduces_the_velocity():
    plain = _perturb(MLP(2, hidden=32, depth=2))
    mean = init_from_velocity(MLP(2, hidden=32, depth=2, mean_flow=True), plain)
    x, t = _rand((5, 2), 1, torch.float32), torch.rand(5)
    torch.testing.assert_close(mean(x, t, r=torch.ones(5)), plain(x, t))  # zero interval embedding
    with pytest.raises(ValueError, match="differ"):
        init_from_velocity(MLP(2, hidden=16, depth=2, mean_flow=True), plain)
    with pytest.raises(ValueError, match="mean_flow=True"):
        MeanFlow(plain)


# ----------------------------------------------------------------------------- MeanFlow / SplitMeanFlow maths


def test_meanflow_jvp_target_matches_finite_difference():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    b, c = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)

    def u_fn(z, r, t):  # an arbitrary smooth average-velocity field
        return torch.tanh(z @ A + r[:, None] * b + (t[:, None] ** 2) * c) * (1 + t[:, None] * r[:, None])

    z, v = _rand((16, 3), 1), _rand((16, 3), 2)
    t = torch.rand(16, generator=g, dtype=torch.float64)
    r = torch.rand(16, generator=g, dtype=torch.float64)
    u, u_tgt = meanflow_target(u_fn, z, r, t, v)
    h = 1e-5  # central difference of u along dz/dt = v, r fixed
    dudt = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(u, u_fn(z, r, t))
    torch.testing.assert_close(u_tgt, v - (t - r)[:, None] * dudt, atol=1e-8, rtol=1e-7)
    assert not u_tgt.requires_grad

    # the same check through a real two-time network (its time features are float32: looser)
    net = _perturb(MLP(3, hidden=32, depth=2, mean_flow=True)).double()
    f = lambda zz, rr, tt: net(zz, tt, r=rr)  # noqa: E731
    u, u_tgt = meanflow_target(f, z, r, t, v)
    h = 1e-4
    dudt = (f(z + h * v, r, t + h) - f(z - h * v, r, t - h)) / (2 * h)
    want = v - (t - r)[:, None] * dudt
    assert float((u_tgt - want.detach()).abs().max()) < 2e-2 * float(want.detach().abs().max())
    assert u.requires_grad  # the loss backpropagates through the primal output


def test_meanflow_identity_is_exact_for_the_true_average_velocity():
    gf = GaussianFlow([1.5, -0.5], s=0.4)
    g = torch.Generator().manual_seed(1)
    t = 0.9 * torch.rand(32, generator=g, dtype=torch.float64)
    r = t + (1 - t) * torch.rand(32, generator=g, dtype=torch.float64).clamp_min(0.05)
    z = gf.a(t)[:, None] * _rand((32, 2), 2) + t[:, None] * gf.mu
    v = gf.velocity(z, t)  # the marginal velocity as the tangent: the target equals u exactly
    u, u_tgt = meanflow_target(gf.u, z, r, t, v)
    torch.testing.assert_close(u_tgt, u, atol=1e-10, rtol=1e-10)
    # the sign convention: a jump from noise (t=0) to r=1 along u lands on the ODE solution
    x0 = _rand((32, 2), 3)
    exact = gf.mu + gf.s * x0  # a(1)/a(0) x0 + mu
    one = sample_mean(gf, x0, steps=1)
    two = sample_mean(gf, x0, steps=2)
    assert one.nfe == 1 and two.nfe == 2 and gf.calls == 3
    torch.testing.assert_close(one.x, exact)
    torch.testing.assert_close(two.x, exact)


def test_split_identity_is_exact_for_the_true_average_velocity():
    gf = GaussianFlow([0.5, 2.0], s=0.7)
    g = torch.Generator().manual_seed(4)
    t = 0.8 * torch.rand(64, generator=g, dtype=torch.float64)
    r = t + 0.05 + (0.95 - t) * torch.rand(64, generator=g, dtype=torch.float64)
    lam = torch.rand(64, generator=g, dtype=torch.float64)
    z = gf.a(t)[:, None] * _rand((64, 2), 5) + t[:, None] * gf.mu
    # (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t), z_s one step along u
    torch.testing.assert_close(split_target(gf.u, z, r, t, lam), gf.u(z, r, t), atol=1e-12, rtol=1e-12)
    # a field that is not an average velocity (the velocity itself, ignoring r) breaks the identity
    wrong = split_target(lambda zz, rr, tt: gf.velocity(zz, tt), z, r, t, lam)
    assert float((wrong - gf.u(z, r, t)).abs().max()) > 1e-2


def test_meanflow_loss_through_a_unet():
    net = _perturb(UNet(1, 8, base_channels=8, channel_mults=(1, 2), attention_resolutions=[4], num_classes=10,
                        mean_flow=True, time_scale=10.0))
    x1 = _rand((4, 1, 8, 8), 0, torch.float32)
    loss = MeanFlow(net, ratio=1.0).loss(x1, cond={"y": torch.arange(4)}, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item()) and net.interval_embed.embed.mlp[2].weight.grad is not None


@pytest.mark.parametrize("objective", ["meanflow", "split"])
def test_average_velocity_objectives_train(objective):
    torch.manual_seed(0)
    model = _perturb(MLP(2, hidden=32, depth=2, mean_flow=True, num_classes=3))
    obj = (MeanFlow(model, ratio=0.5, cond_dropout=0.1) if objective == "meanflow"
           else SplitMeanFlow(model, boundary_ratio=0.5, cond_dropout=0.1))
    json.dumps(obj.config())
    x1 = _rand((64, 2), 0, torch.float32)
    y = torch.arange(64) % 3
    loss = obj.loss(x1, cond={"y": y}, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(float(loss))
    loss.backward()
    assert all(p.grad is not None for p in model.interval_embed.parameters())
    from straightflow.data import Dataset

    res = train(obj, Dataset(x1, y, num_classes=3), steps=5, batch_size=32, progress=False)
    assert len(res.history) >= 1 and math.isfinite(res.final_loss)


def test_meanflow_at_ratio_zero_is_flow_matching():
    model = _perturb(MLP(2, hidden=16, depth=1, mean_flow=True))
    x1, x0 = _rand((32, 2), 0, torch.float32), _rand((32, 2), 1, torch.float32)
    mf = MeanFlow(model, ratio=0.0, adaptive_p=0.0)
    from straightflow import Flow

    fm = Flow(model)
    a = mf.loss(x1, x0=x0, generator=torch.Generator().manual_seed(3))
    b = fm.loss(x1, x0=x0, generator=torch.Generator().manual_seed(3))
    assert math.isfinite(float(a)) and float(a) > 0 and float(b) > 0
    # with r = t the target is v = x1 - x0 whatever the JVP says: compare against a direct computation
    t = torch.rand(32, generator=torch.Generator().manual_seed(9))
    zt = t[:, None] * x1 + (1 - t[:, None]) * x0
    _, tgt = meanflow_target(lambda z, rr, tt: model(z, tt, r=rr), zt, t, t, x1 - x0)
    torch.testing.assert_close(tgt, x1 - x0)


# ----------------------------------------------------------------------------- distillation


def test_k_step_distillation_targets():
    k = 4
    x0, x1 = _rand((8, 3), 0), _rand((8, 3), 1)
    i = torch.arange(8) % k
    t, xt, target = distill_targets(x0, x1, i, k)
    torch.testing.assert_close(t, i.double() / k)
    torch.testing.assert_close(xt, t[:, None] * x1 + (1 - t[:, None]) * x0)
    torch.testing.assert_close(target, (x1 - xt) / (1 - t[:, None]))  # = x1 - x0 at every grid time
    # a student matching the target reaches x1 in exactly k Euler steps on the grid i / k
    x = x0.clone()
    for j in range(k):
        x = x + (1.0 / k) * distill_targets(x0, x1, torch.full((8,), j), k)[2]
    torch.testing.assert_close(x, x1)

    seen = []

    class Zero(torch.nn.Module):
        sample_shape = (3,)

        def forward(self, x, t):
            seen.append(t.clone())
            return torch.zeros_like(x)

    obj = DistillObjective(Zero(), k=k, loss="mse")
    loss = obj.loss(x1, x0=x0, generator=torch.Generator().manual_seed(0))
    grid_t = torch.cat(seen)
    assert torch.all((grid_t * k - (grid_t * k).round()).abs() < 1e-12) and grid_t.max() <= (k - 1) / k
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean())
    with pytest.raises(ValueError, match="x0"):
        obj.loss(x1)
    with pytest.raises(ValueError, match="k"):
        DistillObjective(Zero(), k=0)


def test_perceptual_loss_needs_images():
    with pytest.raises(ValueError, match="perceptual"):
        DistillObjective(MLP(2, hidden=8, depth=1), perceptual=1.0)

    class Vec(torch.nn.Module):  # no sample_shape: caught at the first loss
        def forward(self, x, t):
            return x

    obj = DistillObjective(Vec(), perceptual=0.5)
    with pytest.raises(ValueError, match="images"):
        obj.loss(_rand((4, 2), 0, torch.float32), x0=_rand((4, 2), 1, torch.float32))


def test_perceptual_loss_on_images_uses_a_frozen_classifier():
    from straightflow.metrics import DigitClassifier

    torch.manual_seed(0)
    net = _perturb(UNet(1, 8, base_channels=8, channel_mults=(1,)))
    feat = DigitClassifier()
    x0, x1 = _rand((6, 1, 8, 8), 0, torch.float32), _rand((6, 1, 8, 8), 1, torch.float32).clamp(-1, 1)
    plain = DistillObjective(net, k=2, loss="mse").loss(x1, x0=x0, generator=torch.Generator().manual_seed(0))
    obj = DistillObjective(net, k=2, loss="mse", perceptual=2.0, feature_net=feat)
    loss = obj.loss(x1, x0=x0, generator=torch.Generator().manual_seed(0))
    assert float(loss) > float(plain)  # same times (same generator), plus a positive feature distance
    loss.backward()
    assert all(p.grad is None for p in feat.parameters()) and net.conv_out.weight.grad is not None


def test_distilled_one_step_beats_one_rf(eight_pairs, eight_eval):
    ref, x0, w2_1rf = eight_eval
    torch.manual_seed(0)
    res = distill(eight_pairs, MLP(2, hidden=64, depth=2), k=1, steps=120, batch_size=128, lr=3e-3,
                  ema_decay=0.95, progress=False)
    out = sample(res.model, x0, steps=1)
    w2_d = metrics.w2(out.x, ref)
    assert out.nfe == 1
    assert w2_d < w2_1rf / 2, (w2_d, w2_1rf)  # measured: about 0.3 vs 2.0


@pytest.mark.slow
def test_slimflow_guided_smaller_student(eight, eight_pairs, eight_eval):
    ref, x0, w2_1rf = eight_eval
    teacher = Float32Oracle(eight)

    # the guidance target: the teacher's 2-step Euler prediction through t
    z, t = _rand((5, 2), 0, torch.float32), torch.full((5,), 0.3)
    student = MLP(2, hidden=16, depth=1)
    obj = SlimFlowObjective(student, teacher, guide_weight=1.0, t_range=(0.2, 0.8))
    zt = z + 0.3 * teacher(z, torch.zeros(5))
    torch.testing.assert_close(obj.teacher_two_step(z, t, {}), zt + 0.7 * teacher(zt, t))
    json.dumps(obj.config())
    # with guidance the teacher is the CFG velocity v_null + w (v_cond - v_null)
    cond_teacher = Float32Oracle(eight, conditional=True)
    guided = SlimFlowObjective(MLP(2, hidden=8, depth=1, num_classes=8), cond_teacher, guidance=2.0)
    y = torch.arange(5)

    def cfg(x, tt):
        vn = cond_teacher(x, tt, torch.full_like(y, 8))
        return vn + 2.0 * (cond_teacher(x, tt, y) - vn)

    zt = z + 0.3 * cfg(z, torch.zeros(5))
    torch.testing.assert_close(guided.teacher_two_step(z, t, {"y": y}), zt + 0.7 * cfg(zt, t))
    with pytest.raises(ValueError, match="t_range"):
        SlimFlowObjective(student, teacher, t_range=(0.5, 1.0))

    torch.manual_seed(0)
    res = slimflow_distill(teacher, eight_pairs, MLP(2, hidden=32, depth=1), steps=120, batch_size=128,
                           lr=3e-3, ema_decay=0.95, progress=False)
    w2_s = metrics.w2(sample(res.model, x0, steps=1).x, ref)
    assert w2_s < w2_1rf / 2, (w2_s, w2_1rf)


@pytest.mark.slow
def test_conditional_onestep_with_guidance():
    oracle = GaussianMixtureFlow(means=[[-2.5, 0.0], [2.5, 0.0], [0.0, 2.5]], stds=0.3)
    teacher = Float32Oracle(oracle, conditional=True)
    torch.manual_seed(0)
    kw = {"batch_size": 128, "lr": 3e-3, "ema_decay": 0.95, "progress": False}
    res = conditional_onestep(teacher, 768, guidance=2.0, reflow_model=MLP(2, hidden=64, depth=2, num_classes=3),
                              reflow_steps=120, distill_steps=120, teacher_steps=6, reflow_kw=dict(kw),
                              distill_kw=dict(kw))
    assert res.teacher_pairs.y is not None and res.teacher_pairs.x1.shape == (768, 2)
    assert res.total_nfe == 768 * (6 * 4 * 2) + 768 * 6 * 4  # CFG rows count twice; rk4: 4 evals a step
    student = res.student.model
    y = torch.arange(600) % 3
    out = sample(student, torch.randn(600, 2, generator=torch.Generator().manual_seed(1)), steps=1, cond={"y": y})
    assert out.nfe == 1  # one step, no guidance
    nearest = torch.cdist(out.x.double(), oracle.means).argmin(dim=1)
    assert float((nearest == y).double().mean()) > 0.95
    with pytest.raises(ValueError, match="class-conditional"):
        conditional_onestep(Float32Oracle(oracle), 16, guidance=2.0)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from straightflow.runs import train_run

    d = tmp_path_factory.mktemp("teacher") / "run"
    train_run("moons", str(d), 40, n=2000, hidden=32, depth=1, batch_size=128, progress=False, warmup=5)
    return d


def test_cli_distill(teacher_run, tmp_path, capsys):
    from straightflow.cli import main

    out = tmp_path / "student"
    args = ["--steps", "20", "--batch-size", "64", "--n-eval", "100", "--quiet"]
    assert main(["distill", str(teacher_run), "--out", str(out), "--pairs", "256", "--teacher-steps", "4",
                 "--k", "2", *args]) == 0
    text = capsys.readouterr().out
    assert "| euler | 1 | W2" in text and "| euler | 2 | W2" in text and "initialised from the teacher" in text
    assert (out / "model.safetensors").is_file() and (out / "pairs" / "manifest.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["flow"]["objective"] == "distill" and cfg["flow"]["k"] == 2

    # a pairs directory plus the teacher, with a smaller student: SlimFlow
    small = tmp_path / "small"
    assert main(["distill", str(out / "pairs"), "--teacher", str(teacher_run), "--out", str(small),
                 "--student-hidden", "16", *args]) == 0
    text = capsys.readouterr().out
    assert "SlimFlow" in text and "| euler | 1 |" in text
    assert json.loads((small / "config.json").read_text())["model"]["hidden"] == 16

    assert main(["distill", str(tmp_path / "missing"), "--out", str(small)]) == 2
    assert main(["distill", str(teacher_run), "--out", str(tmp_path / "p"), "--perceptual", "1", *args]) == 2


@pytest.mark.parametrize("split", [False, True])
def test_cli_meanflow(tmp_path, capsys, split):
    from straightflow import load
    from straightflow.cli import main

    out = tmp_path / "mf"
    argv = ["meanflow", "--data", "moons", "--n", "2000", "--out", str(out), "--steps", "15", "--hidden", "32",
            "--depth", "1", "--batch-size", "64", "--n-eval", "100", "--quiet"] + (["--split"] if split else [])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| mean | 1 | W2" in text and "| mean | 2 | W2" in text
    model = load(out)
    assert model.config["mean_flow"] is True
    assert sample_mean(model, torch.zeros(3, 2), steps=1).x.shape == (3, 2)
