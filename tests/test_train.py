"""Trainer: learning, exact resume (also after SIGKILL and under DDP), NaN guard, files, labels, bench."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from straightflow import checkpoint
from straightflow.coupling import PairDataset
from straightflow.data import Dataset, toy_2d
from straightflow.flow import Flow
from straightflow.models import MLP
from straightflow.train import STATE_FILE, NonFiniteLossError, ResumeError, Trainer, read_train_state, train

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Small, fast settings shared by the resume tests (and written verbatim into subprocess scripts).
KW = dict(batch_size=64, lr=3e-3, warmup=4, lr_schedule="cosine", lr_decay_steps=24, ema_decay=0.9,
          ema_start=2, grad_clip=1.0, ckpt_every=4, log_every=4, seed=3, progress=False)
N = 24


def _model(seed: int = 0, **kw) -> MLP:
    torch.manual_seed(seed)
    return MLP(dim=2, hidden=kw.pop("hidden", 32), depth=kw.pop("depth", 1), time_dim=16, **kw)


def _data(n: int = 2048) -> torch.Tensor:
    return toy_2d("8gaussians", n, seed=0)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # One intra-op thread: fast and stable on a shared 2-core box (OpenMP spin-waits under load).
    # The SIGKILL victim runs with the same count, so its numerics match this process bit for bit.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run the resume tests must reproduce bit for bit."""
    return train(Flow(_model(0)), _data(), N, None, **KW)


# ----------------------------------------------------------------------------- learning + files


def test_loss_falls_and_files(tmp_path):
    x = toy_2d("8gaussians", 4096, seed=0)
    res = train(Flow(_model(0, hidden=64)), x, 200, tmp_path, batch_size=128, lr=5e-3, warmup=20,
                log_every=25, ckpt_every=100, progress=False, extra_config={"note": {"who": "test"}})
    first, last = res.history[0][1], res.history[-1][1]
    assert res.steps == 200 and res.history[-1][0] == 200 and len(res.history) == 8
    assert last < 0.8 * first, res.history
    assert res.final_loss == last and math.isfinite(last)
    assert not res.model.training and res.model is not res.raw_model

    # train_state.safetensors: plain safetensors (JSON header), no pickle anywhere
    raw = (tmp_path / STATE_FILE).read_bytes()
    assert raw[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") and raw[:4] != b"PK\x03\x04"
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + hlen])
    assert b"pickle" not in raw[:8 + hlen].lower()
    from safetensors import safe_open

    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["straightflow.train_state"])
    assert header["__metadata__"]["straightflow.train_state"]
    assert meta["step"] == 200 and meta["settings"]["batch_size"] == 128 and len(meta["history"]) == 8
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("ema/") for k in keys)
    assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in keys)
    assert {"rng/data/0", "rng/noise/0", "rng/torch/0", "sampler/perm/0"} <= keys
    tensors, meta2 = read_train_state(tmp_path / STATE_FILE)
    assert meta2 == meta and tensors["rng/data/0"].dtype == torch.uint8

    cfg = json.loads((tmp_path / "config.json").read_text())
    for section in ("flow", "train", "data", "model"):
        assert section in cfg, cfg.keys()
    assert cfg["data"]["shape"] == [2] and cfg["train"]["steps"] == 200 and cfg["note"] == {"who": "test"}
    assert cfg["flow"]["path"]["name"] == "linear" and cfg["model"]["name"] == "mlp"
    loaded = checkpoint.load(tmp_path)
    assert _same(loaded, res.model)  # model.safetensors holds the EMA weights


# ----------------------------------------------------------------------------- resume


def test_stop_half_then_resume_is_exact(tmp_path, reference):
    a = train(Flow(_model(0)), _data(), N // 2, tmp_path, **KW)
    assert a.steps == N // 2
    b = train(Flow(_model(7)), _data(), N, tmp_path, **KW)  # init is overwritten by the saved state
    assert b.steps == N
    assert _same(b.raw_model, reference.raw_model)
    assert _same(b.model, reference.model)
    assert b.history == reference.history and b.final_loss == reference.final_loss
    # already done: a further call is a no-op that returns the saved state
    c = train(Flow(_model(9)), _data(), N, tmp_path, **KW)
    assert c.steps == N and _same(c.raw_model, reference.raw_model)


def test_resume_after_sigkill_is_exact(tmp_path, reference):
    out = tmp_path / "run"
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        torch.set_num_threads({torch.get_num_threads()})
        from straightflow.data import toy_2d
        from straightflow.flow import Flow
        from straightflow.models import MLP
        from straightflow.train import train
        torch.manual_seed(0)
        m = MLP(dim=2, hidden=32, depth=1, time_dim=16)
        m.register_forward_pre_hook(lambda mod, args: time.sleep(0.1))  # slow, numerics unchanged
        train(Flow(m), toy_2d("8gaussians", 2048, seed=0), {N}, sys.argv[1], **{KW!r})
    """))
    proc = subprocess.Popen([PY, str(script), str(out)], cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not (out / STATE_FILE).exists():
            if proc.poll() is not None:
                pytest.fail(f"victim exited early: {proc.stdout.read().decode()[-2000:]}")
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _, meta = read_train_state(out / STATE_FILE)
    assert 0 < meta["step"] < N
    res = train(Flow(_model(5)), _data(), N, out, **KW)
    assert res.steps == N
    assert _same(res.raw_model, reference.raw_model)
    assert _same(res.model, reference.model)
    assert res.history == reference.history


def test_resume_mismatch_is_a_clear_error(tmp_path):
    train(Flow(_model(0)), _data(), 2, tmp_path, batch_size=32, progress=False)
    with pytest.raises(ResumeError, match="batch_size"):
        train(Flow(_model(0)), _data(), 4, tmp_path, batch_size=16, progress=False)
    with pytest.raises(ResumeError, match="model config"):
        train(Flow(_model(0, hidden=48)), _data(), 4, tmp_path, batch_size=32, progress=False)


# ----------------------------------------------------------------------------- NaN guard + checks


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    m = _model(0)
    calls = {"n": 0}

    def poison(mod, args, output):  # the 8th forward (= step 8) returns NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 8 else output

    m.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"step 8\b") as ei:
        # log="none": the sample grid logged at a checkpoint would call the (hooked) model too
        train(Flow(m), _data(), 20, tmp_path, batch_size=32, ckpt_every=5, progress=False, log="none")
    err = ei.value
    assert err.step == 8 and math.isnan(err.loss)
    assert "lower learning rate" in str(err) and "data" in str(err) and "loss=nan" in str(err)
    _, meta = read_train_state(tmp_path / STATE_FILE)
    assert meta["step"] == 5  # the last good checkpoint, untouched
    good = checkpoint.load(tmp_path)
    assert all(torch.isfinite(v).all() for v in good.state_dict().values())
    assert all(torch.isfinite(p).all() for p in m.parameters())  # no optimizer step on bad grads


def test_input_errors_before_any_work(tmp_path):
    x = _data(256)
    with pytest.raises(ValueError, match="steps"):
        Trainer(Flow(_model()), x, tmp_path, 0)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(Flow(_model()), x, tmp_path, 10, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        Trainer(Flow(_model()), torch.zeros(0, 2), tmp_path, 10)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Trainer(Flow(_model()), bad, tmp_path, 10)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trainer(Flow(_model()), x, tmp_path, 10, device="cuda")
    with pytest.raises(ValueError, match="lr_schedule"):
        Trainer(Flow(_model()), x, tmp_path, 10, lr_schedule="linear")
    with pytest.raises(ValueError, match="PairDataset"):
        Trainer(Flow(_model(), coupling="pairs"), x, tmp_path, 10)
    labelled = Dataset(x=x, y=torch.arange(256) % 3, num_classes=3)
    with pytest.raises(ValueError, match="unconditional"):
        Trainer(Flow(_model()), labelled, tmp_path, 10)
    assert not any(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- data kinds


class _Recorder(MLP):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(None if y is None else y.clone())
        return super().forward(x, t, y)


def test_labels_reach_the_model():
    n, b = 300, 50
    x = _data(n)
    data = Dataset(x=x, y=torch.arange(n) % 3, num_classes=3, name="lab")
    torch.manual_seed(0)
    m = _Recorder(dim=2, hidden=16, depth=1, time_dim=16, num_classes=3)
    train(Flow(m), data, 8, None, batch_size=b, seed=11, progress=False)
    assert len(m.seen) == 8 and all(y is not None and y.shape == (b,) for y in m.seen)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11))  # the sampler's first epoch
    assert torch.equal(m.seen[0], data.y[perm[:b]])
    assert torch.equal(m.seen[1], data.y[perm[b:2 * b]])
    # classifier-free guidance dropout reaches the model as the null class
    torch.manual_seed(0)
    m2 = _Recorder(dim=2, hidden=16, depth=1, time_dim=16, num_classes=3)
    train(Flow(m2, cond_dropout=0.5), data, 4, None, batch_size=b, progress=False)
    ys = torch.cat(m2.seen)
    assert (ys == 3).any() and (ys < 3).any()


def test_pair_dataset_passes_stored_noise():
    x1 = _data(256)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    res = train(Flow(_model(0), coupling="pairs"), PairDataset(x0=x0, x1=x1), 30, None,
                batch_size=64, lr=3e-3, progress=False, log_every=10)
    assert res.steps == 30 and math.isfinite(res.final_loss)


# ----------------------------------------------------------------------------- DDP


DDP_SCRIPT = """
import sys, torch
import torch.distributed as dist
from straightflow.data import toy_2d
from straightflow.flow import Flow
from straightflow.models import MLP
from straightflow.train import train

def model():
    torch.manual_seed(0)
    return MLP(dim=2, hidden=32, depth=1, time_dim=16)

kw = dict(batch_size=32, lr=3e-3, ema_decay=0.9, ckpt_every=5, log_every=5, seed=1, progress=False)
data = toy_2d("moons", 1024, seed=0)
root, mode = sys.argv[1], sys.argv[2]
if mode == "first":  # the trainer initialises (and destroys) the process group itself
    r = train(Flow(model()), data, 10, root + "/b", **kw)
    assert not dist.is_initialized(), "process group left behind"
    print(f"RANK-DONE steps={r.steps}", flush=True)
else:  # a user-owned group, reused (and left alone) by two trainers
    dist.init_process_group("gloo")
    a = train(Flow(model()), data, 20, root + "/a", **kw)   # uninterrupted
    b = train(Flow(model()), data, 20, root + "/b", **kw)   # resumes the first launch's run
    assert dist.is_initialized()
    same = all(torch.equal(u, v) for u, v in zip(a.raw_model.state_dict().values(), b.raw_model.state_dict().values()))
    dist.destroy_process_group()
    print(f"RANK-DONE same={same} steps={b.steps}", flush=True)
"""


def _torchrun(script: Path, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), *args]
    p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    log = _torchrun(script, str(tmp_path), "first")
    assert log.count("RANK-DONE steps=10") == 2, log[-4000:]
    _, meta = read_train_state(tmp_path / "b" / STATE_FILE)
    assert meta["world_size"] == 2 and meta["step"] == 10 and len(meta["sampler_pos"]) == 2
    log = _torchrun(script, str(tmp_path), "second")  # a restart: resume under DDP is exact
    assert log.count("RANK-DONE same=True steps=20") == 2, log[-4000:]
    ta, meta = read_train_state(tmp_path / "a" / STATE_FILE)
    assert meta["world_size"] == 2 and meta["step"] == 20
    assert not torch.equal(ta["rng/data/0"], ta["rng/data/1"])  # per-rank generator states
    m = checkpoint.load(tmp_path / "a")
    assert _same(m, checkpoint.load(tmp_path / "b"))
    assert m(torch.zeros(4, 2), torch.full((4,), 0.5)).shape == (4, 2)


# ----------------------------------------------------------------------------- bench


def test_bench_train_tiny(tmp_path):
    from benchmarks.train import bench_train

    md = bench_train(tmp_path, steps=3, batch_size=32, hidden=16, repeats=1, threads=1, depth=1, n_data=256)
    assert (tmp_path / "train.md").read_text() == md
    assert (tmp_path / "train.png").stat().st_size > 0
    assert "ratio to bare loop" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    for want in ("bare PyTorch loop", "straightflow Trainer", "torchcfm", "flow_matching"):
        assert any(n.startswith(want) for n in names), names
    bare = next(r for r in rows if "bare PyTorch loop" in r)
    assert bare.rstrip(" |").endswith("1.000")
