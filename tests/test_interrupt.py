"""Ctrl-C / SIGTERM during training: a checkpoint at the step reached, one line, exit 130, resume.

The mechanism is one context manager (:func:`straightflow.train.interruptible`) used by the trainer
(so by ``train``, ``align``, ``reflow``, ``distill``, ``meanflow``, ``latent``, ``policy``) and by
pair generation; ``cli/main.py`` turns :class:`straightflow.train.Interrupted` into the line.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from straightflow import Flow, models
from straightflow.train import STATE_FILE, Interrupted, Trainer, interruptible, read_train_state

ROOT = Path(__file__).resolve().parent.parent
# the line, after the progress bar's last state (a terminal ends the bar with a newline, a pipe may not)
LINE = re.compile(r"interrupted at step (\d+) of (\d+); rerun the same command to resume$", re.M)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("STRAIGHTFLOW_MAX_STEPS", None)
    return env


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _interruptible_signals():
    """In-process tests see SIGINT as an interactive session does (Python's KeyboardInterrupt handler),
    whatever the test runner inherited; restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)


def _run_until(cmd, at_step: int, sig=signal.SIGINT, timeout: float = 240.0):
    """Run ``cmd``, send ``sig`` once its progress bar passes ``at_step``; -> (rc, stdout, stderr)."""
    # a user's terminal: SIGINT/SIGTERM at their defaults (a test run launched as a background job of a
    # non-interactive shell inherits SIGINT ignored, which the library keeps on purpose, as nohup users expect)
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_default_signals)
    err: list = []
    seen = threading.Event()

    def read():
        buf = ""
        while True:
            ch = p.stderr.read(1)
            if not ch:
                return
            buf += ch.decode(errors="replace")
            err.append(ch)
            m = re.findall(r"(\d+)/\d+ \[", buf[-200:])
            if m and int(m[-1]) >= at_step:
                seen.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    deadline = time.time() + timeout
    while not seen.is_set() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(timeout=timeout)  # stderr belongs to the reader thread; stdout is short
    finally:
        if p.poll() is None:  # never leave a 100000-step run behind
            p.kill()
            p.wait()
    t.join(timeout=10)
    out = p.stdout.read()
    return p.returncode, out.decode(), b"".join(err).decode(errors="replace")


def _cmd(out: Path, *extra: str):
    return [sys.executable, "-m", "straightflow", *extra, "train", "--data", "moons", "--steps", "100000",
            "--hidden", "32", "--depth", "1", "--batch-size", "64", "--out", str(out)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_interrupt_checkpoints_and_resumes(tmp_path, sig):
    out = tmp_path / "run"
    rc, stdout, stderr = _run_until(_cmd(out), at_step=5, sig=sig)
    assert rc == 130, (rc, stdout, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = LINE.findall(stderr)
    assert len(lines) == 1, stderr[-2000:]
    step, total = map(int, lines[0])
    assert 5 <= step < total == 100000
    _, meta = read_train_state(out / STATE_FILE)
    assert meta["step"] == step
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    if sig != signal.SIGINT:
        return
    # rerun the same command (capped so it ends): it resumes from the checkpoint, the step count continues
    r = subprocess.run(_cmd(out, "--max-steps", str(step + 3)), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed {out} from step {step}" in r.stdout and f"trained to step {step + 3}" in r.stdout
    _, meta = read_train_state(out / STATE_FILE)
    assert meta["step"] == step + 3


def _toy_trainer(out, steps=50, **kw):
    net = models.build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1}, seed=0)
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    return Trainer(Flow(net), data, out, steps, batch_size=16, progress=False, **kw)


def test_trainer_stops_at_the_step_boundary_and_resumes_exactly(tmp_path):
    """In-process: a stop request during step 7 finishes it, checkpoints step 7 and raises Interrupted; the
    resumed run ends where an uninterrupted one does, bit for bit."""
    tr = _toy_trainer(tmp_path / "a", steps=20)
    orig = tr.flow.loss
    calls = {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(*a, **k)

    tr.flow.loss = loss
    with pytest.raises(Interrupted) as e:
        tr.fit()
    assert (e.value.step, e.value.total, e.value.unit) == (7, 20, "step")
    assert str(e.value) == "interrupted at step 7 of 20; rerun the same command to resume"
    assert read_train_state(tmp_path / "a" / STATE_FILE)[1]["step"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = _toy_trainer(tmp_path / "a", steps=20).fit()
    straight = _toy_trainer(tmp_path / "b", steps=20).fit()
    assert resumed.resumed_from == 7
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(p, q)


def test_interruptible_second_ctrl_c_stops_at_once():
    with interruptible() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop and stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_pairs_interrupt_keeps_finished_shards(tmp_path):
    from straightflow.straighten.pairs import generate_pairs

    net = models.build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1}, seed=0).eval()
    calls = {"n": 0}

    def teacher(x, t, **c):
        calls["n"] += 1
        if calls["n"] == 1:  # during the first shard
            os.kill(os.getpid(), signal.SIGTERM)
        return net(x, t, **c)

    teacher.sample_shape = (2,)
    with pytest.raises(Interrupted) as e:
        generate_pairs(teacher, tmp_path / "p", 40, shape=(2,), solver="euler", steps=2, shard_size=10, progress=False)
    assert (e.value.step, e.value.total, e.value.unit) == (1, 4, "shard")
    assert str(e.value) == "interrupted at shard 1 of 4; rerun the same command to resume"
    assert sorted(p.name for p in (tmp_path / "p").glob("shard-*")) == ["shard-00000.safetensors"]
