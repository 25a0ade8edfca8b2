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
