"""One calibration API for every kind: ``sf.optimize.calibrate`` -> ``sf.sample(model, noise, solver=cal)``.

Asserted: every registered kind returns a calibration that ``sf.sample`` runs with exactly its NFE
and the same numbers as the kind's own sampler; the learned kind beats its initial classical
solver on held-out noise of an oracle field; calibrations record and enforce what they are valid
for (weights, shape, guidance, NFE); saved calibrations round-trip through JSON beside a run and
are refused (and recomputed) for changed weights; the calibration runs inside a diffusers-style
denoising loop through ``StraightflowScheduler``.
"""
import json

import numpy as np

import pytest
import torch

import straightflow as sf
from straightflow.optimize import (CalibrationMismatch, calibrate, calibration_kinds, calibration_path,
                                   load_calibration, model_fingerprint, stored_calibrations)
from straightflow.optimize.search import run_schedule
from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers.learned import sample_learned


def rmse(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def oracle_problem():
    """(8-component 2D oracle, held-out noise, its tight dopri5 endpoints); not conftest's ``oracle``."""
    o = GaussianMixtureFlow.random(dim=2, n_components=8, seed=0)
    xh = torch.randn(256, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = sf.sample(o, xh, solver="dopri5", steps=1, rtol=1e-10, atol=1e-10).x
    return o, xh, ref


@pytest.fixture(scope="module")
def learned(oracle_problem):
    o, _, _ = oracle_problem
    return calibrate(o, "learned", "auto", 5, (256, 2), mode="ls")


def test_kinds_are_listed():
    assert {"learned", "dc", "boss", "search"} <= set(calibration_kinds())


def test_learned_calibration_samples_through_sf_sample(oracle_problem, learned):
    o, xh, ref = oracle_problem
    cal = learned
    assert cal.kind == "learned" and cal.nfe == 5 and cal.shape == [2] and cal.guidance is None
    out = sf.sample(o, xh, solver=cal)
    assert out.nfe == 5
    same = sample_learned(o, xh, cal.learned_solver)
    assert torch.equal(out.x, same.x)
    init = cal.info["initial_solver"]
    assert init and not cal.info["fallback"]
    # better than the classical solver it started from, on noise it never saw
    from straightflow.solvers.learned import LearnedSolver
    start = LearnedSolver.from_dict(cal.info["initial_table"])
    assert rmse(out.x, ref) < 0.7 * rmse(sample_learned(o, xh, start).x, ref)
    assert cal.info["n_params"] <= 100


@pytest.mark.parametrize("kind,solver", [("boss", "euler"), ("search", "euler+midpoint"), ("dc", "unipc")])
def test_every_kind_runs_through_sf_sample(oracle_problem, kind, solver):
    o, xh, ref = oracle_problem
    opts = dict(fine_steps=32, batch=64)
    if kind == "search":
        opts.update(grids=("uniform",), beam=2)
    cal = calibrate(o, kind, solver, 4, **opts)
    out = sf.sample(o, xh, solver=cal)
    assert out.nfe == 4
    if cal.table is None:
        assert torch.equal(out.x, run_schedule(o, xh, cal.grid_tensor, cal.solvers).x)
    else:
        assert torch.equal(out.x, sample_learned(o, xh, cal.learned_solver).x)
    assert cal.holdout_rmse is not None and cal.shape == [2]


def test_calibration_refuses_what_it_was_not_made_for(oracle_problem, learned):
    o, xh, _ = oracle_problem
    cal = learned
    with pytest.raises(CalibrationMismatch, match="shape"):
        sf.sample(o, torch.zeros(4, 3, dtype=torch.float64), solver=cal)
    with pytest.raises(CalibrationMismatch, match="guidance"):
        sf.sample(o, xh, solver=cal, guidance=2.0)
    with pytest.raises(ValueError, match="NFE 5"):
        sf.sample(o, xh, solver=cal, steps=8)
    with pytest.raises(ValueError, match="grid"):
        sf.sample(o, xh, solver=cal, grid="logsnr")
    other = GaussianMixtureFlow.random(dim=2, n_components=8, seed=1)
    with pytest.raises(CalibrationMismatch, match="other weights"):
        sf.sample(other, xh, solver=cal)
    with pytest.raises(TypeError, match="solver name"):
        sf.sample(o, xh, solver=3)
    with pytest.raises(ValueError, match="nfe"):
        calibrate(o, "learned", "auto", 0, (8, 2))


def test_any_velocity_callable_calibrates_and_cannot_be_stored_without_weights(oracle_problem, tmp_path):
    o, xh, _ = oracle_problem
    f = lambda x, t: o(x, t)  # noqa: E731  (a plain function: no weights to fingerprint)
    cal = calibrate(f, "learned", "euler", 3, (64, 2), mode="ls")
    assert cal.fingerprint == "" and sf.sample(f, xh, solver=cal).nfe == 3
    with pytest.raises(ValueError, match="fingerprint"):
        calibrate(f, "learned", "euler", 3, (64, 2), run_dir=tmp_path)


def test_saved_calibration_round_trips_and_refuses_a_changed_model(tmp_path):
    from straightflow.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "time_dim": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    run = sf.save_model(tmp_path / "run", model)
    cal = calibrate(run, "learned", "auto", 4, batch=64, mode="ls")
    p = calibration_path(run, "learned", "auto", 4)
    assert p.is_file() and json.loads(p.read_text())["table"]["kind"] == "learned"
    back = load_calibration(run, "learned", "auto", 4)
    assert back is not None and back.to_dict() == json.loads(json.dumps(cal.to_dict()))
    assert [c.kind for c in stored_calibrations(run)] == ["learned"]
    assert calibrate(run, "learned", "auto", 4).created == cal.created  # reused, no model call
    m = sf.load(run)
    z = torch.randn(16, 2)
    assert torch.equal(sf.sample(m, z, solver=back).x, sf.sample(m, z, solver=cal).x)
    with torch.no_grad():
        model.out.bias.add_(1.0)
    sf.save_model(run, model)  # retrained weights
    with pytest.raises(CalibrationMismatch, match="other weights"):
        sf.sample(sf.load(run), z, solver=back)
    assert load_calibration(run, "learned", "auto", 4) is None
    again = calibrate(run, "learned", "auto", 4, batch=64, mode="ls")
    assert again.fingerprint == model_fingerprint(model) != cal.fingerprint


class _Guided(torch.nn.Module):
    """A class-conditional toy with a null class (label 8): the oracle plus a label-dependent drift."""

    def __init__(self, o):
        super().__init__()
        self.o = o
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 9, dtype=torch.float64))

    def forward(self, x, t, y):
        return self.o(x, t) + self.w[y].unsqueeze(-1) * (1 - t).reshape(-1, 1) * 0.5


def test_guided_calibration_records_its_scale(oracle_problem):
    o, xh, _ = oracle_problem
    m = _Guided(o)
    m.null_class = 8
    y = {"y": torch.arange(64) % 8}
    cal = calibrate(m, "learned", "auto", 4, (64, 2), cond=y, guidance=2.0, mode="ls")
    assert cal.guidance == 2.0
    z = xh[:64]
    out = sf.sample(m, z, solver=cal, cond=y)
    assert out.nfe == 8  # guided: two rows per evaluation
    assert torch.equal(out.x, sf.sample(m, z, solver=cal, cond=y, guidance=2.0).x)
    with pytest.raises(CalibrationMismatch, match="guidance 2.0"):
        sf.sample(m, z, solver=cal, cond=y, guidance=3.0)


def test_command_line_calibrate_then_sample_calibrated(tmp_path, capsys):
    from straightflow.cli.main import main

    run = tmp_path / "moons"
    assert main(["train", "--data", "moons", "--n", "2000", "--steps", "60", "--batch-size", "64",
                 "--out", str(run), "--quiet"]) == 0
    assert main(["sample", str(run), "--calibrated", "--out", str(tmp_path / "x.png")]) == 2
    assert "straightflow calibrate" in capsys.readouterr().err  # says how to make one
    assert main(["calibrate", str(run), "--nfe", "4", "--batch", "128", "--mode", "ls", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out RMSE" in out and "learned-auto-nfe4.json" in out
    png = tmp_path / "cal.png"
    assert main(["sample", str(run), "--calibrated", "--n", "64", "--out", str(png)]) == 0
    assert "NFE 4" in capsys.readouterr().out and png.is_file()
    x = np.load(png.with_suffix(".npz"))["x"]
    m = sf.load(run)
    cal = load_calibration(run, "learned", "auto", 4)
    z = torch.as_tensor(np.load(png.with_suffix(".npz"))["noise"])
    assert np.allclose(x, sf.sample(m, z, solver=cal).x.numpy(), atol=1e-6)
    assert main(["sample", str(run), "--calibrated", "--nfe", "6", "--out", str(png)]) == 2
    assert "no calibration at NFE 6" in capsys.readouterr().err
    # training on changes the weights: the stored calibration is refused, not silently used
    assert main(["train", "--data", "moons", "--n", "2000", "--steps", "70", "--batch-size", "64",
                 "--out", str(run), "--quiet"]) == 0
    assert main(["sample", str(run), "--calibrated", "--out", str(png)]) == 2
    assert "other weights" in capsys.readouterr().err


def test_nfe_records_the_evaluations_made_and_budget_the_request(oracle_problem, tmp_path):
    """A BOSS grid for midpoint (2 evaluations a step) at budget 5 has 2 steps: it makes 4
    evaluations. ``nfe`` says 4 (what sampling costs), ``budget`` 5 (what was asked, the file name)."""
    o, xh, _ = oracle_problem
    cal = calibrate(o, "boss", "midpoint", 5, (64, 2), run_dir=tmp_path, save=True, fine_steps=64)
    assert cal.nfe == 4 and cal.budget == 5 and cal.budget_nfe == 5
    assert sf.sample(o, xh[:8], solver=cal).nfe == 4
    assert calibration_path(tmp_path, "boss", "midpoint", 5).is_file()
    again = load_calibration(tmp_path, "boss", "midpoint", 5, model=o)
    assert again is not None and again.nfe == 4 and again.budget == 5
    assert "budget 5" in cal.describe()
