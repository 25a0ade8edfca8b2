"""``straightflow bench straighten --quick`` end to end: tables, JSON, figures, caching/resume."""
from __future__ import annotations

import json

import pytest

from benchmarks import straighten as bs
from straightflow.cli import main as cli_main


def _rows(md: str, section: str) -> dict:
    part = md.split(f"## {section}:", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in part.splitlines():
        if line.startswith("| ") and not line.startswith("| method") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_bench_straighten_quick_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    rc = cli_main(["bench", "straighten", "--out", str(out), "--quick", "--datasets", "moons,8g-moons,digits"])
    assert rc == 0
    md = (out / "straighten.md").read_text()
    res = json.loads((out / "straighten.json").read_text())
    for f in ("straighten_nfe.png", "samples_moons.png", "samples_8g-moons.png", "samples_digits.png"):
        assert (out / f).stat().st_size > 1000, f
    assert "straightflow bench straighten" in md and "Floor" in md

    expected = [m[0] for m in bs.METHODS if not m[4]]
    for ds in ("moons", "8g-moons", "digits"):
        rows = _rows(md, ds)
        want = expected + (["conditional distilled"] if ds == "digits" else [])
        assert list(rows) == want, (ds, list(rows))
        entry = res["datasets"][ds]
        assert entry["floor"] > 0 and entry["metric"] == ("FD" if ds == "digits" else "W2")
        for name, e in entry["methods"].items():
            if ds == "8g-moons" and name == "SlimFlow student":
                assert e["status"] == "not applicable" and "Gaussian" in e["error"]
                continue
            assert e["status"] == "ok", (ds, name, e.get("error"))
            s = e["summary"]
            assert all(s[f"nfe{k}"][0] > 0 for k in bs.NFES) and s["straightness"][0] >= 0
    moons = res["datasets"]["moons"]["methods"]
    # cost bookkeeping: reflow adds pair NFE on top of the 1-RF's training rows, distillation more again
    c1, c2, cd = (moons[k]["summary"]["cost"] for k in ("1-RF", "2-RF", "distilled 2-RF (k=1)"))
    S = bs.SETTINGS[("2d", True)]
    assert c1 == {"pair_nfe": 0, "train_rows": S.base_steps * S.batch, "total": S.base_steps * S.batch}
    assert c2["pair_nfe"] == S.n_pairs * 4 * S.pair_steps
    assert c2["train_rows"] == (S.base_steps + S.reflow_steps) * S.batch
    assert cd["total"] > c2["total"]

    # resume: a second invocation reuses every finished run (no training: the stage files stay untouched)
    stage = out / "runs" / "moons" / "1-rf" / "seed0" / "stage.json"
    before = stage.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("finished runs must be reused, not retrained")

    monkeypatch.setattr(bs, "train", no_training)
    assert bs.main(["--out", str(out), "--quick", "--datasets", "moons"]) == 0
    assert stage.stat().st_mtime_ns == before
    again = json.loads((out / "straighten.json").read_text())
    assert again["datasets"]["moons"]["methods"]["1-RF"]["summary"] == moons["1-RF"]["summary"]


def test_bench_straighten_lists_unimportable_methods(tmp_path, monkeypatch):
    real = bs._available
    monkeypatch.setattr(bs, "_available",
                        lambda m: "ImportError: no module named x" if m.endswith("meanflow") else real(m))
    monkeypatch.setattr(bs, "METHODS", [m for m in bs.METHODS if m[0] in ("1-RF", "MeanFlow")])
    bs.run_bench(tmp_path, ["moons"], 1, True, log=lambda s: None)
    rows = _rows((tmp_path / "straighten.md").read_text(), "moons")
    assert rows["MeanFlow"][0] == "not available" and "ImportError" in rows["MeanFlow"][-1]
    assert rows["1-RF"][0] not in ("not available", "failed")


def test_bench_straighten_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        bs.main(["--out", str(tmp_path), "--quick", "--datasets", "nope"])
    with pytest.raises(ValueError):
        bs.main(["--out", str(tmp_path), "--quick", "--seeds", "0"])


def test_bench_straighten_wcfm_sweep(tmp_path):
    bs.main(["--out", str(tmp_path), "--quick", "--datasets", "moons", "--wcfm-sweep", "0.5,4"])
    res = json.loads((tmp_path / "straighten.json").read_text())
    rows = res["wcfm_sweep"]["moons"]["rows"]
    assert [r["epsilon"] for r in rows] == [0.5, 4.0, "inf"]  # plain CFM appended as the reference
    assert all(r["quality"][str(k)] > 0 for r in rows for k in bs.NFES)
    md = (tmp_path / "straighten.md").read_text()
    assert "W-CFM: epsilon sweep" in md and "| inf |" in md
    with pytest.raises(ValueError, match="wcfm-sweep"):
        bs.main(["--out", str(tmp_path), "--quick", "--datasets", "moons", "--wcfm-sweep", "0,x"])


@pytest.mark.slow
def test_bench_straighten_mnist_quick(tmp_path):
    from straightflow.data import mnist_path

    if mnist_path() is None:
        pytest.skip("MNIST (mnist_test_10k.npz) is not in ../shared/data on this machine")
    bs.main(["--out", str(tmp_path), "--quick", "--datasets", "mnist"])
    res = json.loads((tmp_path / "straighten.json").read_text())
    entry = res["datasets"]["mnist"]
    assert entry["metric"] == "FD" and entry["floor"] > 0
    assert entry["methods"]["1-RF"]["status"] == "ok"
    cond = entry["methods"]["conditional distilled"]
    assert cond["status"] == "not applicable" and "labels" in cond["error"]
    assert (tmp_path / "samples_mnist.png").stat().st_size > 1000


def test_bench_straighten_skips_absent_mnist(tmp_path, monkeypatch):
    from straightflow import data as sfdata

    def absent(path=None):
        raise FileNotFoundError("mnist_test_10k.npz not found (test)")

    monkeypatch.setattr(sfdata, "mnist", absent)
    logs = []
    res = bs.run_bench(tmp_path, ["mnist"], 1, True, log=logs.append)
    assert res["datasets"] == {} and any("mnist skipped" in line for line in logs)
