"""Bad command lines get one ``error: ...`` line (exit 2), never a traceback, and before any long work."""
from __future__ import annotations

import pytest

from straightflow.cli import main


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "moons"
    assert main(["train", "--data", "moons", "--n", "500", "--steps", "4", "--batch-size", "32", "--hidden", "16",
                 "--depth", "1", "--out", str(run), "--quiet"]) == 0
    return run


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_align_unknown_option_is_one_line(moons_run, tmp_path, capsys):
    rc = main(["align", str(moons_run), "--method", "dpo", "--reward", "region:disc:0,0,1", "--steps", "1",
               "--out", str(tmp_path / "a"), "--opt", "bogus=1", "--quiet"])
    assert rc == 2
    line = _error(capsys)
    assert "'bogus'" in line and "gen_steps" in line and "k" in line
    assert not (tmp_path / "a").exists()  # refused before any work


def test_out_of_memory_is_one_line(moons_run, tmp_path, capsys):
    rc = main(["sample", str(moons_run), "--n", "100000000000", "--out", str(tmp_path / "s.png")])
    assert rc == 2
    line = _error(capsys)
    assert line.startswith("error: out of memory") and "--n" in line


def test_out_of_memory_line_reads_cuda_and_cpu_messages():
    from straightflow.cli.main import out_of_memory

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 256000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert "238 GiB" in out_of_memory(cpu)
    gpu = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total capacity)")
    assert "20 GiB" in out_of_memory(gpu)
    assert out_of_memory(RuntimeError("shape mismatch")) is None


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--threads", "-1", "list"])
    assert e.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_serve_checks_the_port_before_loading_or_training(monkeypatch, capsys):
    from straightflow.cli import stream as cli_stream

    def no_model(*a, **k):
        raise AssertionError("the model was loaded (or trained) before the port was checked")

    monkeypatch.setattr(cli_stream, "load_stream_model", no_model)
    assert main(["serve", "default", "--port", "99999"]) == 2
    assert "port must be an integer in 1-65535, got 99999" in _error(capsys)
