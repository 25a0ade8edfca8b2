"""CLI smoke tests: every command runs end to end on tiny settings and writes what it says."""
import json
import subprocess
import sys

import numpy as np
import pytest

from straightflow.cli import main, run_demo


def test_list_prints_every_family(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("solvers: ", "euler", "paths: ", "linear", "checkerboard", "digits", "u_shaped", "pseudo_huber"):
        assert word in out


def test_help_everywhere(capsys):
    for cmd in ([], ["train"], ["sample"], ["eval"], ["demo"], ["bench"], ["list"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0 and "usage" in capsys.readouterr().out
    # the installed entry point itself, once
    r = subprocess.run([sys.executable, "-m", "straightflow.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout


def test_train_sample_eval_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "moons", "--n", "2000", "--steps", "60", "--batch-size", "64",
                 "--hidden", "32", "--depth", "1", "--out", str(run), "--quiet", "--ckpt-every", "30"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["name"] == "mlp" and cfg["data_source"] == "moons"
    png = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "50", "--solver", "heun", "--steps", "3", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    z = np.load(tmp_path / "s.npz")
    assert z["x"].shape == (50, 2) and np.isfinite(z["x"]).all()
    md = tmp_path / "e.md"
    assert main(["eval", str(run), "--nfe", "1,4", "--n", "200", "--out", str(md)]) == 0
    text = md.read_text()
    assert "floor" in text and text.count("| euler |") == 2


def test_image_run_samples_a_grid_with_labels(tmp_path):
    run = tmp_path / "img"
    assert main(["train", "--data", "digits", "--steps", "4", "--batch-size", "8", "--base-channels", "8",
                 "--out", str(run), "--quiet"]) == 0
    png = tmp_path / "d.png"
    assert main(["sample", str(run), "--n", "20", "--steps", "2", "--label", "3", "--guidance", "2.0",
                 "--out", str(png)]) == 0
    z = np.load(tmp_path / "d.npz")
    assert z["x"].shape == (20, 1, 8, 8) and (z["y"] == 3).all()


def test_errors_name_valid_choices(tmp_path, capsys):
    assert main(["train", "--data", "nope", "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "checkerboard" in err and "digits" in err
    assert main(["train", "--data", "moons", "--path", "zigzag", "--out", str(tmp_path / "r2"), "--steps", "1"]) == 2
    assert "linear" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_writes_report_and_plots(tmp_path):
    """`demo --quick` shows recognisable digits: within 3x of the FD floor at NFE 100 (held-out digits)."""
    md = run_demo(str(tmp_path / "out"), quick=True, progress=False)
    for f in ("report.md", "report.json", "checkerboard.png", "digits.png"):
        assert (tmp_path / "out" / f).is_file()
    assert "floor" in md and md.count("| euler |") == 11 and "held-out" in md  # 5 + 5 NFE rows, 1 few-step row
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["digits"][-1]["nfe"] == 100 and rep["digits"][-1]["ratio"] < 3.0, rep["digits"][-1]
    assert rep["checkerboard"][-1]["ratio"] < 3.0, rep["checkerboard"][-1]
    # the few-step section: Euler, AB2 and a calibrated solver at NFE 4, same noise; the calibrated
    # one is closer to the accurate solve than Euler, and its file is stored beside the run
    few = rep["few_step"]["rows"]
    assert [r[1] for r in few] == [4, 4, 4] and few[2][2] < few[0][2], few
    assert "Few-step sampling" in md and (tmp_path / "out" / "few-step.png").is_file()
    assert list((tmp_path / "out" / "run-digits" / "calibrations").glob("learned-auto-nfe4.json"))


def test_invert_report_and_boss_grid(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "moons", "--n", "1000", "--steps", "40", "--batch-size", "64",
                 "--hidden", "32", "--depth", "1", "--out", str(run), "--quiet"]) == 0
    md = tmp_path / "inv.md"
    assert main(["invert", str(run), "--solvers", "euler,midpoint,dpm++2m", "--nfe", "4,16", "--n", "64",
                 "--out", str(md)]) == 0
    rows = [l for l in md.read_text().splitlines() if l.startswith("| ") and "solver" not in l]
    assert len(rows) == 6
    err = {(r.split("|")[1].strip(), int(r.split("|")[3])): float(r.split("|")[5]) for r in rows}
    assert err[("euler", 16)] < err[("euler", 4)] and err[("midpoint", 8)] < err[("euler", 4)]
    png = tmp_path / "b.png"
    assert main(["sample", str(run), "--n", "32", "--steps", "4", "--grid", "boss", "--out", str(png)]) == 0
    assert list((run / "calibrations").glob("boss-euler-nfe4.json"))


# ----------------------------------------------------------------------------- --nfe: a budget for every solver
@pytest.fixture(scope="module")
def nfe_runs(tmp_path_factory):
    """Two tiny moons runs (different seeds, so different weights); the first has a learned calibration
    at NFE 4 (small batch, so the test stays fast)."""
    from straightflow.optimize import calibrate

    root = tmp_path_factory.mktemp("nfe")
    runs = []
    for seed in (0, 1):
        run = root / f"run{seed}"
        assert main(["train", "--data", "moons", "--n", "1000", "--steps", "30", "--batch-size", "64", "--hidden", "16",
                     "--depth", "1", "--out", str(run), "--quiet", "--no-calibrate", "--seed", str(seed)]) == 0
        runs.append(run)
    cal = calibrate(str(runs[0]), "learned", "auto", 4, (32, 2), rtol=1e-4, mode="ls")
    return runs[0], runs[1], cal


def _sample(run, tmp_path, *flags_):
    out = tmp_path / "s.png"
    code = main(["sample", str(run), "--n", "16", "--out", str(out), "--quiet", *flags_])
    return code, (np.load(out.with_suffix(".npz")) if code == 0 else None)


def test_sample_nfe_uses_the_stored_calibration(nfe_runs, tmp_path, capsys):
    import torch

    import straightflow as sf

    run, _, cal = nfe_runs
    code, z = _sample(run, tmp_path, "--nfe", "4")
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0].startswith("using calibration ") and "learned-auto-nfe4.json" in out[0]
    assert "held-out RMSE" in out[0] and out[-1].startswith("16 samples, NFE 4")
    model = sf.load(str(run))
    want = sf.sample(model, torch.as_tensor(z["noise"]), solver=cal).x
    assert np.allclose(z["x"], want.numpy(), atol=1e-6)
    # --calibrated keeps working (and requires one)
    code, z2 = _sample(run, tmp_path, "--calibrated", "--nfe", "4")
    assert code == 0 and np.array_equal(z["x"], z2["x"])


def test_sample_nfe_solver_overrides_and_auto_fallback(nfe_runs, tmp_path, capsys):
    from straightflow.solvers.auto import AUTO_TABLE

    run = nfe_runs[0]
    code, _ = _sample(run, tmp_path, "--nfe", "4", "--solver", "heun")
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 1 and out[0].startswith("16 samples, NFE 4")  # heun, 2 steps: no calibration
    code, _ = _sample(run, tmp_path, "--nfe", "5", "--solver", "dpm++2s")  # 2 steps cost 2, 3 cost 4: within 5
    assert code == 0 and capsys.readouterr().out.splitlines()[-1].startswith("16 samples, NFE 4")
    code, _ = _sample(run, tmp_path, "--nfe", "7")  # nothing stored at 7: the auto solver, said in one line
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 2 and out[0].startswith("no valid calibration for NFE 7: solver auto -> "
                                                             f"{AUTO_TABLE[7][0]},")
    assert out[1].startswith("16 samples, NFE 7")


def test_sample_nfe_ignores_a_stale_calibration(nfe_runs, tmp_path, capsys):
    import shutil

    run, other, _ = nfe_runs
    stale = tmp_path / "stale"
    shutil.copytree(other, stale)
    shutil.copytree(run / "calibrations", stale / "calibrations")  # fitted to run0's weights, beside run1's
    code, _ = _sample(stale, tmp_path, "--nfe", "4")
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0].startswith("ignored ") and "other weights" in out[0]
    assert out[1].startswith("no valid calibration for NFE 4: solver auto") and out[2].startswith("16 samples, NFE 4")
    assert main(["sample", str(stale), "--calibrated", "--nfe", "4", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "stale" in err and "other weights" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags_, expect", [
    (["--nfe", "4", "--steps", "4"], "not both"),
    (["--calibrated", "--solver", "heun", "--steps", "8"], "choose it with --nfe, not --steps"),
    (["--calibrated", "--solver", "heun"], "replaces --solver"),
    (["--steps", "4", "--solver", "auto"], "give it with --nfe"),
    (["--nfe", "1", "--solver", "heun"], "NFE 1 is below the cost of one heun step (2)"),
    (["--nfe", "4", "--grid", "cosine"], "needs a named --solver"),
])
def test_sample_flag_conflicts_are_one_line_errors(nfe_runs, tmp_path, capsys, flags_, expect):
    assert main(["sample", str(nfe_runs[0]), "--out", str(tmp_path / "x.png"), *flags_]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and len(err.splitlines()) == 1


def test_invert_refuses_a_negative_budget_and_eval_meets_budgets(nfe_runs, tmp_path, capsys):
    run = nfe_runs[0]
    with pytest.raises(SystemExit) as e:
        main(["invert", str(run), "--nfe", "-4", "--n", "8"])
    assert e.value.code == 2 and "every value must be an integer >= 1, got -4" in capsys.readouterr().err
    assert main(["invert", str(run), "--solvers", "rk4", "--nfe", "2", "--n", "8"]) == 2
    assert "NFE 2 is below the cost of one rk4 step (4)" in capsys.readouterr().err
    md = tmp_path / "e.md"
    assert main(["eval", str(run), "--solver", "dpm++2s", "--nfe", "4,16", "--n", "64", "--out", str(md)]) == 0
    rows = [ln.split("|") for ln in md.read_text().splitlines() if ln.startswith("| dpm++2s")]
    assert [int(r[2]) for r in rows] == [4, 16]


# ----------------------------------------------------------------------------- train ends by calibrating
class _FakeRes:
    def __init__(self, run, steps=100, resumed_from=None):
        self.run_dir, self.steps, self.resumed_from = run, steps, resumed_from


def test_train_calibrates_within_a_quarter_of_its_wall_time(nfe_runs, monkeypatch, capsys):
    """The budget is min(library default, 25% of the measured training time), split over the NFEs, announced
    in one line; each NFE reports one result line (a stand-in calibrate records what it was asked)."""
    import inspect

    from straightflow.cli import core
    from straightflow.optimize import calibrate as real

    calls = []

    def fake(run, kind, solver, nfe, noise_or_shape=None, *, budget_s=60.0, progress=False, **kw):
        calls.append((kind, solver, nfe, budget_s, progress))
        return real(run, kind, solver, nfe, (16, 2), rtol=1e-4, mode="ls", save=False, **kw)

    monkeypatch.setattr(core, "calibrate", fake)
    run = nfe_runs[0]
    cals = core.calibrate_after_training(_FakeRes(run), wall_s=40.0, nfes=[8, 4], progress=False)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "calibrating NFE 4, 8 for fast sampling (budget ~10 CPU s; --no-calibrate to skip)"
    assert [c[:3] for c in calls] == [("learned", "auto", 4), ("learned", "auto", 8)]
    assert all(abs(c[3] - 5.0) < 1e-9 for c in calls) and len(cals) == 2
    assert out[1].startswith("NFE 4: learned (") and "held-out RMSE" in out[1] and out[2].startswith("NFE 8: ")
    calls.clear()  # a long run: the library default (60 s per NFE here) caps it
    core.calibrate_after_training(_FakeRes(run), wall_s=4000.0, nfes=[4], progress=True)
    assert calls[0][3] == 60.0 and calls[0][4] is True
    assert "budget ~60 CPU s" in capsys.readouterr().out
    del inspect


def test_train_skips_the_calibration_with_a_reason(nfe_runs, monkeypatch, capsys, max_steps):
    from straightflow.cli import core

    monkeypatch.setattr(core, "calibrate", lambda *a, budget_s=1.0, **k: pytest.fail("must not calibrate"))
    run = nfe_runs[0]
    assert core.calibrate_after_training(_FakeRes(run), wall_s=4.0, nfes=[4, 8]) == []  # 1 CPU s: too little
    assert capsys.readouterr().out.startswith("calibration skipped: training took 4.0 s: 25% of it (1.0 CPU s)")
    assert core.calibrate_after_training(_FakeRes(run, 30, resumed_from=30), wall_s=400.0, nfes=[4]) == []
    assert "nothing was trained" in capsys.readouterr().out
    with max_steps(5):
        assert core.calibrate_after_training(_FakeRes(run), wall_s=400.0, nfes=[4]) == []
    assert "smoke-test step cap" in capsys.readouterr().out
    # the command line: a short run skips it in one line; --no-calibrate says nothing
    out = nfe_runs[0].parent / "short"
    assert main(["train", "--data", "moons", "--n", "500", "--steps", "5", "--hidden", "8", "--depth", "1",
                 "--out", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("calibration skipped: ")
    assert main(["train", "--data", "moons", "--n", "500", "--steps", "8", "--hidden", "8", "--depth", "1",
                 "--out", str(out), "--quiet", "--no-calibrate"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
