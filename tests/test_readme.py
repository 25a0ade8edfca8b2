"""The README runs as written: the Python examples, and every `straightflow` command line of its
command block, in order, in a fresh directory.

Step counts shrink without editing the lines: for the command lines ``STRAIGHTFLOW_MAX_STEPS``, which
the command line (and only it) reads, caps every training run and puts the benchmark suites in
``--quick`` mode (the test sets it to ``$STRAIGHTFLOW_README_STEPS``, default 3); the Python example
runs inside the explicit override ``straightflow.train.max_steps`` (the ``max_steps`` fixture). ``straightflow serve`` runs in a subprocess until its
page answers. Options in brackets (``[--improved]``) are optional and left out.
"""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SMOKE_STEPS = os.environ.get("STRAIGHTFLOW_README_STEPS", "3")


def command_lines():
    block = re.search(r"## Command line\n\n```bash\n(.*?)```", README, re.S).group(1)
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.startswith("straightflow ")]


def _argv(line: str):
    return shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]


def _smoke_env(tmp_path, monkeypatch):
    """A fresh working directory and cache (the project classifier copied in, it is not what is tested)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STRAIGHTFLOW_MAX_STEPS", SMOKE_STEPS)
    cache = tmp_path / "cache"
    shared = Path(os.environ.get("STRAIGHTFLOW_CACHE", "")) / "classifiers"
    if shared.is_dir():
        shutil.copytree(shared, cache / "classifiers")
    monkeypatch.setenv("STRAIGHTFLOW_CACHE", str(cache))


def test_readme_example_runs(tmp_path, monkeypatch, max_steps):
    """The ten-line example, exactly as written (training capped by the explicit smoke override)."""
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert "sf.train(" in code and "sf.sample(" in code
    _smoke_env(tmp_path, monkeypatch)
    with max_steps(20):
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "cb" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "cb" / "config.json").read_text())["step"] == 20
    # as written it is reproducible: a second run in another directory gives the same weights
    from straightflow.io import load_tensors

    again = tmp_path / "again"
    again.mkdir()
    monkeypatch.chdir(again)
    with max_steps(20):
        exec(compile(code, "README.md", "exec"), {})
    a, b = load_tensors(tmp_path / "runs/cb/model.safetensors"), load_tensors(again / "runs/cb/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_readme_diffusers_snippet_runs():
    pytest.importorskip("diffusers")
    from types import SimpleNamespace

    code = next(c for c in re.findall(r"```python\n(.*?)```", README, re.S) if "StraightflowScheduler" in c)
    scope = {"pipe": SimpleNamespace(scheduler=None)}
    exec(compile(code, "README.md", "exec"), scope)
    assert type(scope["pipe"].scheduler).__name__ == "StraightflowScheduler"


def test_readme_calibration_snippet_runs():
    code = next(c for c in re.findall(r"```python\n(.*?)```", README, re.S) if "optimize.calibrate" in c)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    cal, out = scope["cal"], scope["out"]
    assert out.nfe == 4 and cal.holdout_rmse <= cal.info["holdout_rmse"]["init"]
    st = cal.info["holdout_stats"]
    assert cal.info["sizing"]["self_sized"] and st["lo"] <= st["rmse"] <= st["hi"]


def test_readme_command_lines_parse():
    """Every `straightflow ...` line of the README's command block is accepted by the CLI parser."""
    from benchmarks import SUITES
    from benchmarks.harness import parser as suite_parser
    from straightflow.cli import build_parser

    lines = command_lines()
    assert len(lines) >= 10
    parser = build_parser()
    for ln in lines:
        a, extra = parser.parse_known_args(_argv(ln))
        assert not extra, (ln, extra)
        if a.cmd == "bench":  # the suite's own options are checked by the suite's parser
            suite_parser(SUITES.get(a.suite)).parse_args(a.args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _serve(argv, log):
    """Run `straightflow serve ...` until its page and health endpoint answer, then stop it (on a free
    port if the README's is taken on this machine)."""
    port = int(argv[argv.index("--port") + 1])
    if not _port_free(port):
        port = _free_port()
        argv = [*argv[:argv.index("--port") + 1], str(port), *argv[argv.index("--port") + 2:]]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "straightflow.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, f"straightflow serve exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if json.loads(r.read()) == {"status": "ok"}:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "straightflow serve did not answer within 600 s"
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"new WebSocket" in r.read()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # every README command in a row: 5-10 minutes on 2 idle cores, more under load
def test_readme_command_lines_run_as_written(tmp_path, monkeypatch, capsys):
    """Every command line of the README, in order, in an empty directory: each exits with status 0.
    The lines that build on earlier ones find what those made (runs/moons for pairs, pairs/moons
    for reflow, ...)."""
    from straightflow.cli import main

    _smoke_env(tmp_path, monkeypatch)
    times = []
    with open(tmp_path / "serve.log", "wb") as log:
        for line in command_lines():
            argv = _argv(line)
            t0 = time.perf_counter()
            if argv[0] == "serve":
                _serve(argv, log)
            else:
                code = main(argv)
                err = capsys.readouterr().err
                assert code == 0, f"`{line}` exited with {code}: {err[-2000:]}"
            times.append((time.perf_counter() - t0, line))
    print("\n".join(f"{t:6.1f} s  {ln}" for t, ln in sorted(times, reverse=True)[:8]))
    for f in ("runs/digits/model.safetensors", "digits.png", "out/report.md", "pairs/moons/manifest.json",
              "runs/moons-1step/onestep_report.md", "runs/moons-mf/model.safetensors", "edit.png", "restore.png",
              "search.png", "gen/samples.npz", "stream_out/latency.md", "bench_out/stream.md", "hub/digits/README.md"):
        assert (tmp_path / f).is_file(), f
    # reflow trained on the pairs the line before made, not on pairs of its own
    manifest = json.loads((tmp_path / "pairs/moons/manifest.json").read_text())
    rcfg = json.loads((tmp_path / "runs/moons-2rf/config.json").read_text())
    assert rcfg["reflow"]["pairs"]["recipe_sha256"] == manifest["recipe_sha256"]
    assert not (tmp_path / "runs/moons-2rf/pairs").exists()
