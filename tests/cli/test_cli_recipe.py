"""Issue 20 (recipe completion): align, latent, reflow and meanflow build their training settings once,
with ``cli.flags.train_settings(a)``, and the settings equal those the commands spelled out before."""
from __future__ import annotations

import inspect

import pytest

from straightflow.cli import align, flags, images, straighten
from straightflow.cli.main import build_parser
from straightflow.straighten.reflow import default_ema
from straightflow.train import TrainSettings


@pytest.mark.parametrize("fn", [align.cmd_align, images.cmd_latent, straighten.cmd_reflow, straighten.cmd_meanflow])
def test_commands_build_settings_with_train_settings(fn):
    src = inspect.getsource(fn)
    assert "flags.train_settings(a" in src
    for spelled in ("lr=a.lr", "batch_size=a.batch_size", "ckpt_every=a.ckpt_every"):
        assert spelled not in src, (fn.__name__, spelled)


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_the_settings_are_those_spelled_before():
    a = _args("align", "run", "--method", "dpo", "--out", "o", "--steps", "30", "--lr", "3e-4", "--quiet")
    got = flags.train_settings(a, log_every=min(a.log_every, a.steps))
    assert got == TrainSettings(steps=30, batch_size=32, lr=3e-4, ema_decay=0.0, grad_clip=1.0, ckpt_every=100,
                                seed=0, progress=False, device="cpu", warmup=0, log_every=30)
    a = _args("latent", "--data", "digits", "--out", "o", "--flow-steps", "70", "--device", "cpu")
    got = flags.train_settings(a, steps=a.flow_steps, warmup=images.FLOW_WARMUP)
    assert got == TrainSettings(steps=70, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999, seed=0,
                                ckpt_every=500, device="cpu", progress=True)
    a = _args("reflow", "run", "--out", "o", "--train-steps", "400", "--steps", "8", "--device", "cpu")
    got = flags.train_settings(a, steps=a.train_steps, ema_decay=default_ema(a.train_steps))
    assert got == TrainSettings(steps=400, batch_size=256, lr=1e-3, seed=0, ema_decay=0.95, device="cpu")
    a = _args("meanflow", "--out", "o", "--steps", "9", "--device", "cpu", "--log", "none")
    assert flags.train_settings(a) == TrainSettings(steps=9, batch_size=256, lr=1e-3, warmup=100, ema_decay=0.999,
                                                    ckpt_every=1000, seed=0, device="cpu", log="none")
