"""``straightflow train --model tarflow``, ``sample --solver sequential|gs-jacobi`` and ``eval`` on an NF run."""
from __future__ import annotations

import numpy as np
import pytest

from straightflow.cli.main import main


def test_train_sample_eval_tarflow(tmp_path, capsys):
    run = tmp_path / "tf"
    assert main(["train", "--model", "tarflow", "--data", "digits", "--out", str(run), "--steps", "3", "--batch-size",
                 "16", "--blocks", "2", "--nf-width", "16", "--nf-layers", "1", "--patch-size", "4", "--levels", "17",
                 "--ckpt-every", "3", "--quiet", "--device", "cpu"]) == 0
    assert "final NLL" in capsys.readouterr().out
    outs = {}
    for solver in ("sequential", "gs-jacobi"):
        out = tmp_path / f"{solver}.png"
        assert main(["sample", str(run), "--solver", solver, "--n", "6", "--tol", "0", "--out", str(out),
                     "--quiet", "--device", "cpu"]) == 0
        outs[solver] = np.load(out.with_suffix(".npz"))["x"]
    assert np.abs(outs["sequential"] - outs["gs-jacobi"]).max() < 1e-4
    assert main(["sample", str(run), "--solver", "dpm++2m", "--n", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown normalizing-flow solver" in capsys.readouterr().err
    assert main(["eval", str(run), "--n", "20", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "bits/dim (held-out" in text and "FD floor" in text
