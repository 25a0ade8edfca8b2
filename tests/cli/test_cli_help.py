"""``--help`` says what every option defaults to, in the form it is typed (issue 24 item 8)."""
from __future__ import annotations

import pytest

from straightflow.cli import main


def _help(capsys, *cmd) -> str:
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_model_commands_take_device(capsys):
    for cmd in ("align", "policy"):
        assert "--device DEVICE" in _help(capsys, cmd), cmd


@pytest.mark.parametrize("cmd, text", [
    (("sample",), "classifier-free guidance scale (default: none)"),
    (("calibrate",), "classifier-free guidance scale to calibrate at (default: none)"),
    (("align",), "(default: the rank, i.e. scale 1)"),
    (("restore",), "(units of 1/||A||^2 for flowchef) (default: 1.0)"),
    (("policy",), "(default: runs/policy)"),
    (("eval",), "default 1,2,4,8,100"),  # readable, not a Python list (the help names it itself)
])
def test_defaults_are_shown(capsys, cmd, text):
    assert text in _help(capsys, *cmd)


def test_no_python_lists_or_raw_backticks(capsys):
    for cmd in ("align", "eval", "invert", "publish"):
        h = _help(capsys, cmd)
        assert "``" not in h and "default: [" not in h, cmd


def test_quick_help_says_what_it_takes():
    from benchmarks import harness
    from benchmarks.solvers import suite

    p = harness.parser(suite.SUITE)
    h = " ".join(p.format_help().split())
    assert "seconds" not in h and "about 8" in h


@pytest.mark.parametrize("cmd", ["train", "align", "reflow", "distill", "meanflow", "latent", "policy"])
def test_every_training_command_takes_log(capsys, cmd):
    assert "--log {csv,tensorboard,wandb,none}" in _help(capsys, cmd)
