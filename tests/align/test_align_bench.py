"""``straightflow bench align --quick``: the structure of its outputs (not the figures)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("gymnasium", reason="the control task needs gymnasium (pip install 'straightflow[align]')")


def test_bench_align_quick_writes_tables_json_and_plots(tmp_path):
    from straightflow.align import available
    from straightflow.cli import main

    assert main(["bench", "align", "--out", str(tmp_path), "--quick"]) == 0
    for f in ("align.md", "align.json", "align_frontier.png", "align_cost.png", "align_digits.png", "align_control.png"):
        assert (tmp_path / f).is_file(), f
    res = json.loads((tmp_path / "align.json").read_text())
    assert res["quick"] and set(res["tasks"]) == {"2d", "digits", "ink", "control"}
    for name in ("2d", "digits", "ink"):
        t = res["tasks"][name]
        assert [r["method"] for r in t["rows"]] == ["sft", "rwr", "dpo", "grpo", "reinflow", "adjoint_matching", "draft"]
        assert sorted(available()) == sorted(r["method"] for r in t["rows"])
        for r in [t["base"]] + t["rows"]:
            assert set(r["reward"]) == {"1", "4", "20"} and set(r["held_out"]) == {"1", "4", "20"}
            assert {"quality@4", "quality@20", "quality_floor", "diversity"} <= set(r)
        for r in t["rows"]:
            assert r["train_equiv"] > 0 and r["equal_budget"] >= 4 and "w2_drift" in r and r["cost"]["seconds"] >= 0
        assert [s["method"] for s in t["search_20"]] == ["best_of_n", "smc", "rbf", "nrg"]
        assert all(s["nfe"] <= s["budget"] for s in t["search_20"])
        (m, rows), = t["search_equal"].items()
        assert all(s["budget"] == next(r["equal_budget"] for r in t["rows"] if r["method"] == m) for s in rows)
    assert "base_conditional" in res["tasks"]["digits"]
    c = res["tasks"]["control"]["rows"]
    assert {r["denoise_steps"] for r in c} == {1, 4} and all("bc" in r and "reinflow" in r for r in c)
    md = (tmp_path / "align.md").read_text()
    assert "## Against the targets" in md and "Flow-DPO vs Flow-RWR" in md and "### digits" in md
