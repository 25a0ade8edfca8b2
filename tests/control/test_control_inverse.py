"""Measurement operators against their definitions; FlowChef / DPS / FLAIR / PMRF; edit/restore CLI; bench."""
import json
import pytest
import torch

from straightflow.control import inverse, operators
from straightflow.control.operators import make_operator

SHAPE = (1, 8, 8)
ALL_OPS = ["inpaint_box", "inpaint_random", "sr2", "sr4", "deblur"]


def _x(n=4, seed=0, shape=SHAPE):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- operators
@pytest.mark.parametrize("name", ALL_OPS)
def test_adjointness(name):
    op = make_operator(name, SHAPE)
    x = _x(3)
    y = torch.randn(op(x).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    m = op.matrix()
    assert torch.allclose(op.adjoint(y).reshape(3, -1), y.reshape(3, -1) @ m, atol=1e-12)


@pytest.mark.parametrize("name", ALL_OPS)
def test_pseudo_inverse_and_projection(name):
    op = make_operator(name, SHAPE)
    x, z = _x(3, 2), _x(3, 3)
    y = op(x)
    a_pinv_a = op(op.pinv(op(z)))
    if op.exact_pinv:  # Moore-Penrose A A^+ A = A, and the projection lands on {A x = y}
        assert torch.allclose(a_pinv_a, op(z), atol=1e-12)
        assert torch.allclose(op(op.project(z, y)), y, atol=1e-12)
        m = op.matrix()
        dense = torch.linalg.pinv(m)
        assert torch.allclose(op.pinv(y).reshape(3, -1), y.reshape(3, -1) @ dense.T, atol=1e-10)
    p1 = op.project(z, y)
    assert torch.allclose(op.project(p1, y), p1, atol=1e-10)  # idempotent (truncated pinv included)


@pytest.mark.parametrize("name", ["inpaint_box", "inpaint_random"])
def test_masks_are_orthogonal_projections(name):
    op = make_operator(name, SHAPE)
    x = _x()
    assert torch.equal(op(op(x)), op(x)) and torch.equal(op.adjoint(x), op(x)) and torch.equal(op.pinv(x), op(x))
    vals = set(op.mask.unique().tolist())
    assert vals == {0.0, 1.0}


def test_box_and_random_masks_match_their_definition():
    box = make_operator("inpaint_box", SHAPE, fraction=0.5)
    assert box.mask[0, 2:6, 2:6].sum() == 0 and box.mask.sum() == 64 - 16
    rnd = make_operator("inpaint_random", (1, 28, 28), p=0.7, seed=3)
    frac_hidden = 1 - rnd.mask.mean().item()
    assert abs(frac_hidden - 0.7) < 0.05
    assert torch.equal(rnd.mask, make_operator("inpaint_random", (1, 28, 28), p=0.7, seed=3).mask)


@pytest.mark.parametrize("f", [2, 4])
def test_super_resolution_definition(f):
    op = make_operator(f"sr{f}", SHAPE)
    c = torch.full((2, *SHAPE), 0.37, dtype=torch.float64)
    assert torch.allclose(op(c), torch.full((2, 1, 8 // f, 8 // f), 0.37, dtype=torch.float64))  # SR of a constant
    x = _x(2)
    assert torch.allclose(op(x)[0, 0, 0, 0], x[0, 0, :f, :f].mean())  # block means
    y = op(x)
    assert torch.allclose(op(op.pinv(y)), y, atol=1e-12)  # A A^+ = I (A has full row rank)
    assert torch.equal(op.pinv(y)[..., :f, :f], y[..., :1, :1].expand(2, 1, f, f))  # nearest upsampling
    with pytest.raises(ValueError, match="not divisible"):
        make_operator("sr4", (1, 6, 6))


def test_gaussian_blur_definition():
    op = make_operator("deblur", (1, 16, 16), sigma=1.5, size=7)
    k = op.kernel1d
    assert torch.allclose(k.sum(), torch.tensor(1.0, dtype=torch.float64)) and torch.allclose(k, k.flip(0))
    r = torch.arange(7, dtype=torch.float64) - 3
    assert torch.allclose(k, torch.exp(-r ** 2 / (2 * 1.5 ** 2)) / torch.exp(-r ** 2 / (2 * 1.5 ** 2)).sum())
    c = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    assert torch.allclose(op(c)[..., 3:-3, 3:-3], c[..., 3:-3, 3:-3])  # interior of a constant is kept
    m = op.matrix()
    assert torch.allclose(m, m.T, atol=1e-14)  # symmetric kernel + zero padding: A = A^T
    delta = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    delta[0, 0, 8, 8] = 1.0
    assert torch.allclose(op(delta)[0, 0, 5:12, 5:12], torch.outer(k, k))  # separable point-spread function
    with pytest.raises(ValueError, match="odd"):
        make_operator("deblur", SHAPE, size=4)


def test_measurement_noise_and_errors():
    op = make_operator("sr2", (1, 32, 32))
    x = torch.zeros(64, 1, 32, 32, dtype=torch.float64)
    y = op.measure(x, 0.1, torch.Generator().manual_seed(0))
    assert abs(y.std().item() - 0.1) < 0.005
    with pytest.raises(ValueError, match="expected images"):
        op(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="valid names"):
        make_operator("inpaint_circle", SHAPE)
    assert set(ALL_OPS) <= set(operators.available())


# ----------------------------------------------------------------------------- methods
class NoGradModel(torch.nn.Module):
    """A small conv velocity model that raises if it is ever run with autograd recording or on an
    input that requires grad (i.e. if anyone backpropagates through it)."""

    def __init__(self, strict=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.strict, self.calls, self.grad_calls = strict, 0, 0

    def forward(self, x, t, y=None):
        self.calls += 1
        if torch.is_grad_enabled() or x.requires_grad:
            self.grad_calls += 1
            if self.strict:
                raise RuntimeError("network gradient requested")
        return self.conv(x) - x * t.reshape(-1, 1, 1, 1)


def test_flowchef_builds_no_graph_through_the_network():
    model = NoGradModel(strict=True)
    op = make_operator("inpaint_box", SHAPE)
    x = _x(4).float()
    y = op.measure(x, 0.05, torch.Generator().manual_seed(0))
    res = inverse.flowchef(model, op, y, steps=8, memory=False)
    assert model.calls == 8 == res.nfe and model.grad_calls == 0
    assert all(p.grad is None for p in model.parameters())
    assert res.x.shape == x.shape and not res.x.requires_grad and res.info["backward_passes"] == 0
    # FLAIR's regulariser is gradient-free too
    fl = inverse.flair(model, op, y, steps=6, sigma_y=0.05, memory=False)
    assert fl.nfe == 6 and model.grad_calls == 0
    # the check is not vacuous: the DPS-style baseline does backpropagate through the network
    with pytest.raises(RuntimeError, match="network gradient"):
        inverse.dps(model, op, y, steps=3, memory=False)
    lax = NoGradModel(strict=False)
    d = inverse.dps(lax, op, y, steps=5, memory=False)
    assert lax.grad_calls == 5 == d.nfe and d.info["backward_passes"] == 5


def test_flowchef_steering_is_a_gradient_step_on_x1_hat():
    """With a zero velocity field, x1_hat = x_t and one FlowChef step moves x_t by -s A^T(A x - y)."""
    zero = lambda x, t, **k: torch.zeros_like(x)  # noqa: E731
    op = make_operator("inpaint_box", SHAPE)
    x0 = _x(2).float()
    y = torch.zeros(2, *SHAPE)
    res = inverse.restore("flowchef", zero, op, y, memory=False, steps=2, step_size=0.5, x0=x0)
    assert torch.allclose(res.x, x0 - 0.5 * op.mask * x0)


def test_flair_hard_consistency_with_exact_pinv():
    model = NoGradModel(strict=False)
    op = make_operator("sr2", SHAPE)
    x = _x(3).float()
    y = op(x)
    res = inverse.flair(model, op, y, steps=5, t_project=1.1, data_steps=0, memory=False)
    assert op.residual(res.x, y).max() < 1e-10


def test_memory_and_timing_are_reported():
    model = NoGradModel(strict=False)
    op = make_operator("deblur", SHAPE)
    y = op(_x(8).float())
    r = inverse.restore("dps", model, op, y, steps=3)
    assert r.seconds > 0 and r.peak_bytes is not None and r.peak_bytes > 0
    _, peak = inverse.peak_memory(lambda: torch.ones(1000, 1000).sum())
    assert peak >= 4_000_000


def test_pmrf_predictor_starts_at_pinv_and_restores():
    op = make_operator("sr2", SHAPE)
    from straightflow.data import digits

    ds = digits()
    p = inverse.PMRF(op, sigma_y=0.05, base_channels=8)
    y = op.measure(ds.x[:8], 0.05, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(p.predict_with(p.predictor, op, y), op.pinv(y))  # zero-initialised output layer
    with pytest.raises(ValueError, match="fit"):
        inverse.restore("pmrf", p, op, y)
    p.fit(ds.x[:256], pm_steps=25, flow_steps=5, batch_size=32, progress=False)
    res = inverse.restore("pmrf", p, op, y, steps=3)
    assert res.nfe == 4 and res.x.shape == (8, *SHAPE) and res.info["flow_nfe"] == 3
    err_pinv = (op.pinv(y) - ds.x[:8]).pow(2).mean()
    err_pm = (p.posterior_mean(y) - ds.x[:8]).pow(2).mean()
    assert err_pm < err_pinv  # 25 MSE steps already beat the pseudo-inverse
    with pytest.raises(ValueError, match="valid: flowchef, dps, flair, pmrf"):
        inverse.restore("ddrm", model := NoGradModel(), op, y)  # noqa: F841


# ----------------------------------------------------------------------------- tuning protocol
def test_validation_split_is_disjoint_from_the_test_images():
    from benchmarks.control import held_out_split

    perm, test, val = held_out_split(200, 128, 32)
    assert sorted(perm.tolist()) == list(range(200))
    assert len(test) == 128 and len(val) == 32 and not set(test.tolist()) & set(val.tolist())
    assert torch.equal(held_out_split(200, 128, 8)[1], test)  # the test set does not depend on n_val
    with pytest.raises(ValueError, match="held-out digits"):
        held_out_split(200, 190, 32)


def test_tuning_grids():
    from benchmarks.control import DEFAULT_PARAMS, tuning_grid

    full, quick = tuning_grid(False), tuning_grid(True)
    assert set(full) == set(quick) == set(DEFAULT_PARAMS) == {"flowchef", "dps", "flair"}
    assert all(len(g) == 2 for g in quick.values())
    assert [p["step_size"] for p in full["dps"]] == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert {(p["step_size"], p["inner"]) for p in full["flowchef"]} == {
        (s, k) for s in (0.25, 0.5, 1.0, 2.0) for k in (1, 2, 3)}


def test_tune_operator_picks_the_best_validation_psnr():
    from benchmarks.control import tune_operator

    model = NoGradModel(strict=False)
    op = make_operator("inpaint_box", SHAPE)
    x_val = _x(6).float().clamp(-1, 1)
    grid = {"flowchef": [{"step_size": 0.25, "inner": 1}, {"step_size": 1.0, "inner": 2}],
            "dps": [{"step_size": 0.1}, {"step_size": 1.0}, {"step_size": 10.0}]}
    best, trials = tune_operator(model, op, x_val, 0.05, 3, grid)
    assert len(trials) == 5 and {t["method"] for t in trials} == {"flowchef", "dps"}
    for m in grid:
        mine = [t for t in trials if t["method"] == m]
        top = max(mine, key=lambda t: t["val_psnr"])
        assert best[m]["params"] == top["params"] and best[m]["val_psnr"] == top["val_psnr"]
    # the chosen FlowChef setting reproduces its validation PSNR (deterministic, same noise draw)
    from straightflow.metrics import psnr

    y = op.measure(x_val, 0.05, torch.Generator().manual_seed(8))
    r = inverse.restore("flowchef", model, op, y, memory=False, steps=3, **best["flowchef"]["params"])
    assert abs(psnr(r.x.clamp(-1, 1), x_val) - best["flowchef"]["val_psnr"]) < 1e-9


# ----------------------------------------------------------------------------- CLI and bench
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from straightflow.runs import train_run

    d = tmp_path_factory.mktemp("run") / "digits"
    # no EMA: with 30 steps an EMA copy would still be the (class-blind) initial network
    train_run("digits", str(d), 30, base_channels=8, batch_size=64, warmup=5, progress=False, ckpt_every=1000,
              ema=0.0, lr=3e-3)
    return str(d)


def test_cli_edit_and_restore(tiny_run, tmp_path, capsys):
    from straightflow.cli import main

    out = tmp_path / "edit.png"
    assert main(["edit", tiny_run, "--source-class", "3", "--target-class", "8", "--n", "4", "--solver", "midpoint",
                 "--steps", "4", "--inject", "1", "--out", str(out)]) == 0
    assert out.is_file() and "NFE 12 (inversion 6 + generation 6)" in capsys.readouterr().out
    for method in ("flowchef", "flair"):
        out = tmp_path / f"restore-{method}.png"
        assert main(["restore", tiny_run, "--operator", "sr2", "--method", method, "--noise", "0.05", "--n", "4",
                     "--steps", "3", "--no-memory", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert out.is_file() and "PSNR" in printed and "SSIM" in printed
    assert main(["restore", tiny_run, "--operator", "blur9", "--n", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["edit", tiny_run, "--source-class", "3", "--target-class", "12", "--out", str(tmp_path / "y.png")]) == 2


def test_class_swap_keeps_more_structure_with_more_injected_steps_on_a_tiny_model(tiny_run):
    from straightflow import load
    from straightflow.control.editing import class_swap_edit
    from straightflow.data import digits

    model = load(tiny_run)
    ds = digits()
    x = ds.x[ds.y == 2][:16]
    d = [(class_swap_edit(model, x, 2, 7, solver="euler", steps=6, inject=k).x - x).pow(2).mean().item() for k in (0, 2, 4, 6)]
    assert d[0] > d[1] > d[2] > d[3] == 0.0


@pytest.mark.slow
def test_bench_control_quick(tiny_run, tmp_path):
    from benchmarks.control import main

    assert main(["--out", str(tmp_path), "--quick", "--model-run", tiny_run, "--skip-others"]) == 0
    md = (tmp_path / "control.md").read_text()
    for part in ("Inversion", "Class-swap", "Inverse problems", "flowchef", "pmrf", "deblur", "hyper-parameters",
                 "validation images", "FlowChef >= DPS"):
        assert part in md
    assert (tmp_path / "control.json").is_file() and (tmp_path / "control-inversion.png").is_file()
    import json

    res = json.loads((tmp_path / "control.json").read_text())
    assert res["tuning"]["tuned"] and res["tuning"]["n_val"] == 8 and len(res["tuning"]["trials"]) == 5 * 3 * 2
    assert len(res["flowchef_vs_dps"]) == 5
    for r in res["inverse"]:
        if r["method"] != "pmrf":
            assert r["params"] == res["tuning"]["chosen"][r["operator"]][r["method"]]["params"]
    # budget sweep: both methods at every step count (2, 4 in quick mode), 5 operators, re-tuned per count
    assert "across budgets" in md and (tmp_path / "control-budget.png").is_file()
    b = res["budget"]
    assert {(r["method"], r["steps"]) for r in b["rows"]} == {(m, k) for m in ("flowchef", "dps") for k in (2, 4)}
    assert all(r["nfe"] == r["steps"] for r in b["rows"]) and len(b["rows"]) == 5 * 2 * 2
    for q in b["summary"]:
        mine = [r for r in b["rows"] if r["operator"] == q["operator"]]
        assert q["best_flowchef"]["val_psnr"] == max(r["val_psnr"] for r in mine if r["method"] == "flowchef")
        for e in q["equal_time"]:  # the matched FlowChef point never takes longer than the DPS point
            d = next(r for r in mine if r["method"] == "dps" and r["steps"] == e["dps_steps"])
            f = next(r for r in mine if r["method"] == "flowchef" and r["steps"] == e["flowchef_steps"])
            assert f["seconds"] <= d["seconds"] and e["ge"] == (f["psnr"] >= d["psnr"])
    out2 = tmp_path / "untuned"
    assert main(["--out", str(out2), "--quick", "--model-run", tiny_run, "--skip-others", "--no-tune"]) == 0
    res2 = json.loads((out2 / "control.json").read_text())
    assert "budget" not in res2  # the sweep tunes on validation images: skipped with --no-tune
    assert not res2["tuning"]["tuned"] and res2["tuning"]["trials"] == []
    assert all(r["params"] == {"step_size": 1.0, "inner": 1} for r in res2["inverse"] if r["method"] == "flowchef")


@pytest.mark.slow
def test_bench_control_mnist_section_quick(tmp_path):
    from benchmarks.control import main
    from straightflow.data import mnist_path

    if mnist_path() is None:
        pytest.skip("MNIST (mnist_test_10k.npz) is not in ../shared/data on this machine")
    assert main(["--out", str(tmp_path), "--quick", "--mnist-only"]) == 0
    md = (tmp_path / "control-mnist.md").read_text()
    assert "Inverse problems on MNIST" in md and "FlowChef vs DPS-style" in md
    res = json.loads((tmp_path / "control-mnist.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"flowchef", "dps", "flair"}
    assert {r["operator"] for r in res["rows"]} == {"inpaint_box", "inpaint_random", "sr2", "sr4", "deblur"}
    assert all(r["nfe"] == 4 for r in res["rows"])
