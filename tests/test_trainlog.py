"""Training logs (issue 24 item 10): scalars.csv by default, TensorBoard events with the loss, sample grids."""
from __future__ import annotations

import csv

import pytest
import torch

from straightflow import Flow, models
from straightflow.cli import main
from straightflow.train import Trainer
from straightflow.trainlog import COLUMNS, check_log


def _rows(run):
    with open(run / "logs" / "scalars.csv", newline="") as f:
        return list(csv.reader(f))


def test_default_run_logs_scalars_csv_and_a_sample_grid(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", "moons", "--n", "500", "--steps", "20", "--batch-size", "32", "--hidden", "16",
                 "--depth", "1", "--log-every", "5", "--out", str(run), "--quiet"]) == 0
    rows = _rows(run)
    assert tuple(rows[0]) == COLUMNS == ("step", "loss", "lr", "grad_norm", "ema_decay", "steps_per_s")
    assert [int(r[0]) for r in rows[1:]] == [5, 10, 15, 20]
    assert all(float(v) >= 0 for r in rows[1:] for v in r[1:])
    assert (run / "logs" / "samples-0000020.png").stat().st_size > 1000  # the 2D scatter at the last checkpoint


def test_tensorboard_events_hold_the_loss_and_the_image(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "img"
    assert main(["train", "--data", "digits", "--steps", "6", "--batch-size", "8", "--base-channels", "8",
                 "--log", "tensorboard", "--log-every", "2", "--out", str(run), "--quiet"]) == 0
    events = list((run / "logs").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert {"train/lr", "train/grad_norm", "train/ema_decay", "train/steps_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [6]
    assert len(_rows(run)) == 4  # the csv is written beside the events


def test_resume_keeps_each_step_once(tmp_path):
    def trainer(steps):
        net = models.build_model({"name": "mlp", "dim": 2, "hidden": 8, "depth": 1}, seed=0)
        return Trainer(Flow(net), torch.randn(64, 2), tmp_path / "r", steps, batch_size=16, progress=False,
                       log_every=2, ckpt_every=4)

    trainer(8).fit()
    # a kill after step 8's log row but before a checkpoint: simulate rows past the resumed state
    with open(tmp_path / "r" / "logs" / "scalars.csv", "a") as f:
        f.write("10,1,1,1,1,1\n")
    trainer(12).fit()
    assert [int(r[0]) for r in _rows(tmp_path / "r")[1:]] == [2, 4, 6, 8, 10, 12]


def test_log_kind_checked_before_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="log must be one of csv, tensorboard, wandb, none"):
        check_log("mlflow")
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert main(["train", "--data", "moons", "--steps", "2", "--log", "wandb", "--out", str(tmp_path / "w"),
                     "--quiet"]) == 2
        assert "pip install wandb" in capsys.readouterr().err
        assert not (tmp_path / "w").exists()


def test_log_none_writes_no_logs(tmp_path):
    net = models.build_model({"name": "mlp", "dim": 2, "hidden": 8, "depth": 1}, seed=0)
    Trainer(Flow(net), torch.randn(64, 2), tmp_path / "n", 4, batch_size=16, progress=False, log="none").fit()
    assert not (tmp_path / "n" / "logs").exists()
