"""Reflow: resumable pair generation, k-RF training (plain, improved, annealed, curved paths),
the re-noising sampler and the CLI."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import straightflow as sf
from straightflow.io import CheckpointError
from straightflow.losses import PseudoHuber, inv_noise_weight
from straightflow.models import build_model
from straightflow.oracle import GaussianMixtureFlow
from straightflow.straighten import pairs as P
from straightflow.straighten import reflow as R
from straightflow.time import UShaped

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _mlp(seed=0, num_classes=None, hidden=32, depth=2):
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "dim": 2, "hidden": hidden, "depth": depth, "num_classes": num_classes}).eval()


def _shas(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).glob("shard-*"))}


# ----------------------------------------------------------------------------- pairs


def test_pairs_manifest_and_content(tmp_path, oracle):
    m = P.generate_pairs(oracle, tmp_path / "p", 300, solver="rk4", steps=5, shard_size=128, seed=3, progress=False)
    assert m["n"] == 300 and m["num_shards"] == 3 and [s["count"] for s in m["shards"]] == [128, 128, 44]
    assert m["nfe_per_pair"] == 20 and m["total_nfe"] == 300 * 20  # rk4: 4 evaluations per step
    assert m["solver"] == "rk4" and m["steps"] == 5 and m["shape"] == [2] and m["seed"] == 3
    on_disk = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert on_disk["shards"] == m["shards"] and all(len(s["sha256"]) == 64 for s in m["shards"])
    ds = P.load_pairs(tmp_path / "p")
    assert isinstance(ds, sf.PairDataset) and ds.info["total_nfe"] == 6000 and len(ds) == 300 and ds.y is None
    # x1 is the teacher's rk4 solution from x0, and shard k's noise is a function of (seed, k) only
    ref = sf.sample(oracle, ds.x0, solver="rk4", steps=5).x
    assert torch.allclose(ds.x1, ref, atol=1e-6)
    g = torch.Generator().manual_seed(P.shard_seed(3, 1))
    assert torch.equal(ds.x0[128:256], torch.randn(128, 2, generator=g))
    assert len(set(ds.x0[:, 0].tolist())) == 300  # no duplicated noise across shards


def test_resume_after_exception_is_bit_identical(tmp_path):
    teacher = _mlp(1)
    kw = dict(solver="heun", steps=3, shard_size=64, seed=0, progress=False)
    ref = P.generate_pairs(teacher, tmp_path / "ref", 320, **kw)  # 5 shards, uninterrupted

    calls = {"n": 0}

    def boom(mod, inp):
        calls["n"] += 1
        if calls["n"] > 2 * 6 + 3:  # heun 3 steps = 6 evaluations per shard: die inside shard 2
            raise KeyboardInterrupt("simulated kill")

    h = teacher.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        P.generate_pairs(teacher, tmp_path / "run", 320, **kw)
    h.remove()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (run / "manifest.json").exists() and not list(run.glob(".*tmp"))
    with pytest.raises(CheckpointError, match="interrupted"):
        P.load_pairs(run)

    calls["n"] = 0
    h = teacher.register_forward_pre_hook(lambda mod, inp: calls.__setitem__("n", calls["n"] + 1))
    m = P.generate_pairs(teacher, run, 320, **kw)
    h.remove()
    assert calls["n"] == 3 * 6  # only the 3 missing shards were computed
    assert _shas(run) == _shas(tmp_path / "ref") and m["shards"] == ref["shards"]
    a, b = P.load_pairs(run), P.load_pairs(tmp_path / "ref")
    assert torch.equal(a.x0, b.x0) and torch.equal(a.x1, b.x1) and len(a) == 320


def test_resume_after_sigkill(tmp_path):
    """A real ``kill -9`` of a generating process: the rerun completes it with identical pairs."""
    script = tmp_path / "gen.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {SRC!r})
        torch.set_num_threads(1)
        from straightflow.oracle import GaussianMixtureFlow
        from straightflow.straighten.pairs import generate_pairs
        o = GaussianMixtureFlow.random(dim=2, n_components=4, seed=1)
        if sys.argv[2] == "slow":
            v = o.velocity
            o.velocity = lambda *a, **k: (time.sleep(0.01), v(*a, **k))[1]
        generate_pairs(o, sys.argv[1], 40 * 32, solver="midpoint", steps=4, shard_size=32, progress=False)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run), "slow"], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(run.glob("shard-*"))) < 3:
            time.sleep(0.05)
        assert proc.poll() is None, "generation finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list(run.glob("shard-*")))
    assert 3 <= done < 40 and not (run / "manifest.json").exists()
    # resume here (same code, same single thread) and compare with an uninterrupted run
    o = GaussianMixtureFlow.random(dim=2, n_components=4, seed=1)
    kw = dict(solver="midpoint", steps=4, shard_size=32, progress=False)
    P.generate_pairs(o, run, 40 * 32, **kw)
    P.generate_pairs(o, tmp_path / "ref", 40 * 32, **kw)
    assert _shas(run) == _shas(tmp_path / "ref") and len(_shas(run)) == 40
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no torn temp files left
    a, b = P.load_pairs(run), P.load_pairs(tmp_path / "ref")
    assert torch.equal(a.x0, b.x0) and torch.equal(a.x1, b.x1)


def test_corrupt_or_missing_shard_is_detected_and_regenerated(tmp_path, oracle):
    d = tmp_path / "p"
    P.generate_pairs(oracle, d, 200, solver="euler", steps=4, shard_size=64, progress=False)
    good = _shas(d)
    f = d / "shard-00001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        P.load_pairs(d)
    (d / "shard-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        P.load_pairs(d)
    with pytest.warns(UserWarning, match="regenerating"):
        P.generate_pairs(oracle, d, 200, solver="euler", steps=4, shard_size=64, progress=False)
    assert _shas(d) == good and len(P.load_pairs(d)) == 200
    # a truncated shard is just as detectable
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError):
        P.load_pairs(d)


def test_other_recipe_in_same_directory_is_refused(tmp_path, oracle):
    d = tmp_path / "p"
    P.generate_pairs(oracle, d, 100, solver="euler", steps=4, shard_size=64, progress=False)
    with pytest.raises(ValueError, match="different recipe"):
        P.generate_pairs(oracle, d, 100, solver="euler", steps=4, shard_size=64, seed=1, progress=False)
    with pytest.raises(ValueError, match="different recipe"):
        P.generate_pairs(_mlp(), d, 100, solver="euler", steps=4, shard_size=64, progress=False)
    with pytest.raises(sf.registry.UnknownNameError, match="rk4"):
        P.generate_pairs(oracle, tmp_path / "q", 10, solver="nope", progress=False)


def test_conditional_pairs_with_guidance(tmp_path):
    model = _mlp(2, num_classes=3)
    m = P.generate_pairs(model, tmp_path / "p", 50, solver="euler", steps=3, labels="cycle", guidance=2.0,
                         shard_size=32, progress=False)
    assert m["nfe_per_pair"] == 6 and m["total_nfe"] == 300 and m["num_classes"] == 3  # 2 rows per guided eval
    ds = P.load_pairs(tmp_path / "p")
    assert torch.equal(ds.y, torch.arange(50) % 3)
    ref = sf.sample(model, ds.x0, solver="euler", steps=3, guidance=2.0, cond={"y": ds.y})
    assert torch.allclose(ds.x1, ref.x, atol=1e-6)
    y = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(0))
    P.generate_pairs(model, tmp_path / "t", 50, steps=2, labels=y, shard_size=32, progress=False)
    assert torch.equal(P.load_pairs(tmp_path / "t").y, y)
    with pytest.raises(ValueError, match="labels"):
        P.generate_pairs(model, tmp_path / "x", 10, guidance=2.0, progress=False)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {SRC!r})
        torch.set_num_threads(1)
        from straightflow.oracle import GaussianMixtureFlow
        from straightflow.straighten.pairs import generate_pairs
        o = GaussianMixtureFlow.random(dim=2, n_components=4, seed=1)
        m = generate_pairs(o, sys.argv[1], 300, solver="rk4", steps=4, shard_size=64, progress=False)
        assert m["n"] == 300
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path / "dd")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    P.generate_pairs(GaussianMixtureFlow.random(dim=2, n_components=4, seed=1), tmp_path / "one", 300,
                     solver="rk4", steps=4, shard_size=64, progress=False)
    assert _shas(tmp_path / "dd") == _shas(tmp_path / "one") and len(_shas(tmp_path / "one")) == 5
    assert json.loads((tmp_path / "dd" / "manifest.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- k-RF


def test_2rf_is_straighter_than_1rf(tmp_path):
    # 1-RF: a tiny MLP on moons, a few hundred steps
    x = sf.data.toy_2d("moons", 4000, seed=0)
    one = sf.train(sf.Flow(_mlp(0, hidden=32)), x, 300, batch_size=128, lr=2e-3, ema_decay=0.95,
                   progress=False, seed=0).model
    P.generate_pairs(one, tmp_path / "p", 2048, solver="rk4", steps=8, shard_size=1024, progress=False)
    two = R.reflow(one, tmp_path / "p", 200, batch_size=128, lr=1e-3, progress=False).model
    s1 = R.straightness_report(one, 512, 16, seed=1)
    s2 = R.straightness_report(two, 512, 16, seed=1)
    assert s1["straightness"] > 0.3 and s2["straightness"] < 0.1 * s1["straightness"], (s1, s2)
    assert s2["first_order"] < 0.1 * s1["first_order"]


def test_2rf_from_the_exact_oracle(tmp_path, oracle):
    """The oracle is a perfect 1-RF (no model error); its 2-RF is far straighter."""
    P.generate_pairs(oracle, tmp_path / "p", 1024, solver="rk4", steps=16, shard_size=512, progress=False)
    res = R.reflow(oracle, tmp_path / "p", 200, init={"name": "mlp", "dim": 2, "hidden": 32, "depth": 2},
                   batch_size=128, lr=2e-3, progress=False)
    s_oracle = R.straightness_report(oracle, 512, 32, seed=1)["straightness"]
    s_two = R.straightness_report(res.model, 512, 32, seed=1)["straightness"]
    assert s_oracle > 0.5 and s_two < 0.1 * s_oracle
    assert res.cost["pair_nfe"] == 1024 * 64 and res.cost["train_steps"] == 200
    with pytest.raises(ValueError, match="init='teacher'"):
        R.reflow(oracle, tmp_path / "p", 2, progress=False)


def test_improved_objective_is_as_stated(tmp_path, oracle):
    m = _mlp()
    f = R.make_objective(m, improved=True)
    assert isinstance(f.time_dist, UShaped) and f.time_dist.a == 4.0
    assert isinstance(f.loss_fn, PseudoHuber) and f.loss_fn.weight is inv_noise_weight
    assert f.coupling.name == "pairs"
    # the loss is the inv_noise-weighted pseudo-Huber on the U-shaped times, exactly
    x0, x1 = torch.randn(64, 2), torch.randn(64, 2)
    got = f.loss(x1, x0=x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = UShaped(4.0).sample(64, generator=g)
    xt = x0 + t[:, None] * (x1 - x0)
    d = (m(xt, t) - (x1 - x0)).pow(2).sum(1)
    c = 0.00054 * math.sqrt(2)
    want = ((torch.sqrt(d + c * c) - c) / math.sqrt(2) / ((1 - t + 1e-3) * math.log((1 + 1e-3) / 1e-3))).mean()
    assert torch.allclose(got, want, rtol=1e-5)
    # U-shaped: more mass in the outer 10% at each end than uniform (closed form of the density)
    ts = UShaped(4.0).sample(20000, generator=torch.Generator().manual_seed(0))
    ends = float(((ts < 0.1) | (ts > 0.9)).double().mean())
    exact = 2 * 0.5 * (math.expm1(0.4) + math.exp(4) - math.exp(3.6)) / math.expm1(4)
    assert abs(ends - exact) < 0.01 and exact > 0.3
    # each part toggles on its own (the ablation)
    assert R.make_objective(m, improved=True, time_dist="uniform").time_dist.name == "uniform"
    assert R.make_objective(m, improved=True, loss="mse").loss_fn.name == "mse"
    assert R.make_objective(m, loss=R.IMPROVED_LOSS).time_dist.name == "uniform"
    # and the run records it
    P.generate_pairs(oracle, tmp_path / "p", 128, solver="euler", steps=4, progress=False)
    res = R.reflow(_mlp(), tmp_path / "p", 5, out=tmp_path / "run", improved=True, progress=False)
    cfg = sf.load_config(tmp_path / "run")
    assert cfg["flow"]["time_dist"]["name"] == "u_shaped" and cfg["flow"]["loss"]["weighting"] == "inv_noise"
    assert cfg["reflow"]["k"] == 2 and cfg["reflow"]["improved"] and cfg["reflow"]["pairs"]["total_nfe"] == 512
    assert res.objective.config()["coupling"]["name"] == "pairs"


def test_anneal_schedule_reaches_zero_and_resumes(tmp_path, oracle):
    s = R.AnnealSchedule(100)
    assert s(0) == 1.0 and s(50) == 0.5 and s(100) == 0.0 and s(1000) == 0.0
    c = R.AnnealSchedule(100, kind="cosine")
    assert c(0) == 1.0 and abs(c(50) - 0.5) < 1e-12 and c(100) == 0.0
    assert all(c(k) >= c(k + 1) for k in range(120))
    with pytest.raises(ValueError, match="linear, cosine"):
        R.AnnealSchedule(10, kind="exp")
    # beta = 1: the source is pure fresh noise; beta = 0: plain reflow on the stored noise
    m = _mlp()
    x0, x1 = torch.randn(32, 2), torch.randn(32, 2)
    f = R.make_objective(m, anneal=2)
    plain = R.make_objective(m)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    fresh = torch.randn(32, 2, generator=g2)
    assert torch.allclose(f.loss(x1, x0=x0, generator=g1), plain.loss(x1, x0=fresh, generator=g2))
    assert f.beta == 0.5 and f.calls == 1
    f.loss(x1, x0=x0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert f.beta == 0.0 and torch.equal(f.loss(x1, x0=x0, generator=g1), plain.loss(x1, x0=x0, generator=g2))
    # in training: one call per step; a resumed run continues the schedule
    P.generate_pairs(oracle, tmp_path / "p", 128, solver="euler", steps=4, progress=False)
    kw = dict(out=tmp_path / "run", anneal={"warmup": 15}, batch_size=32, ema_decay=0.9, progress=False)
    r1 = R.reflow(_mlp(), tmp_path / "p", 10, **kw)
    assert r1.objective.calls == 10 and r1.objective.beta == pytest.approx(1 - 10 / 15)
    r2 = R.reflow(_mlp(), tmp_path / "p", 20, **kw)
    assert r2.objective.calls == 20 and r2.objective.beta == 0.0
    assert sf.load_config(tmp_path / "run")["flow"]["anneal"] == {"warmup": 15, "kind": "linear", "beta0": 1.0}


def test_renoise_sampler(oracle, noise):
    one = R.sample_renoise(oracle, noise, 1)
    eul = sf.sample(oracle, noise, solver="euler", steps=1)
    assert torch.equal(one.x, eul.x) and one.nfe == 1
    # several steps: x_{t'} = t' x1_hat + (1 - t') x0 with the ORIGINAL noise
    r = R.sample_renoise(oracle, noise, 2, return_trajectory=True)
    x1a = noise + oracle.velocity(noise, 0.0)
    xh = 0.5 * x1a + 0.5 * noise
    want = xh + 0.5 * oracle.velocity(xh, 0.5)
    assert torch.allclose(r.x, want, atol=1e-12) and r.nfe == 2 and r.trajectory.shape == (3, 256, 2)
    # on another path it uses that path's data prediction; with 1 step it lands on it
    vp = GaussianMixtureFlow.random(dim=2, n_components=4, seed=1, path="cosine")
    r = R.sample_renoise(vp, noise, 1, path="cosine")
    x1_hat = sf.get_path("cosine").velocity_to_x1(vp.velocity(noise, 0.0), noise, torch.zeros(256, dtype=noise.dtype))
    assert torch.allclose(r.x, x1_hat, atol=1e-10)


def test_reflow_on_a_curved_path_reduces_first_order_deviation(tmp_path):
    """Rectified Diffusion: reflow a cosine-path teacher on its own path."""
    teacher = GaussianMixtureFlow.random(dim=2, n_components=4, seed=1, path="cosine")
    m = P.generate_pairs(teacher, tmp_path / "p", 1024, solver="rk4", steps=16, path="cosine", progress=False)
    assert m["path"]["name"] == "cosine"
    res = R.reflow(teacher, tmp_path / "p", 200, init={"name": "mlp", "dim": 2, "hidden": 32, "depth": 2},
                   batch_size=128, lr=2e-3, progress=False)
    assert res.objective.path.name == "cosine"  # the pairs' path, by default
    before = R.straightness_report(teacher, 512, 32, seed=1, path="cosine")
    after = R.straightness_report(res.model, 512, 32, seed=1, path="cosine")
    assert after["first_order"] < 0.1 * before["first_order"], (before, after)
    assert after["path"] == "cosine" and before["nfe"] == 32


# ----------------------------------------------------------------------------- CLI


def test_cli_reflow_and_pairs(tmp_path, capsys):
    from straightflow.cli import main
    from straightflow.runs import train_run

    run = tmp_path / "run"
    train_run("moons", str(run), 60, hidden=32, depth=2, progress=False)
    out = tmp_path / "rf"
    args = ["reflow", str(run), "--pairs", "256", "--solver", "rk4", "--steps", "4", "--out", str(out),
            "--train-steps", "30", "--shard-size", "128", "--batch-size", "64", "--eval-n", "64",
            "--eval-steps", "4", "--quiet", "--improved"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "straightness" in text and "before" in text and "4096 teacher evaluations" in text
    rep = json.loads((out / "reflow_report.json").read_text())
    assert rep["pairs"]["total_nfe"] == 256 * 16 and rep["after"]["straightness"] >= 0
    two = sf.load(out)
    assert two.run_config["reflow"]["k"] == 2 and two.run_config["data_source"] == "moons"
    assert main(["eval", str(out), "--nfe", "1", "--n", "100"]) == 0  # the k-RF is an ordinary run
    capsys.readouterr()
    assert main(["pairs", str(run), "--n", "100", "--out", str(tmp_path / "pp"), "--steps", "2", "--quiet"]) == 0
    assert "100 pairs" in capsys.readouterr().out and len(P.load_pairs(tmp_path / "pp")) == 100
    assert main(["pairs", str(run), "--n", "10", "--out", str(tmp_path / "bad"), "--solver", "nope"]) == 2
    assert "euler" in capsys.readouterr().err
