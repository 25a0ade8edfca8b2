"""``solver="auto"``: the measured best fixed solver per NFE budget, exactly as docs/solvers-auto.md says.

The mapping the library uses (``straightflow.solvers.auto.AUTO_TABLE``) is parsed out of the documentation
page and compared; every budget in it is spent exactly; nonsense is refused with one clear line. The
fields here use seeds 7 and 11, not the benchmark's 1001-1003.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import straightflow as sf
from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import AUTO, available, choices, get_solver, invert, resolve_auto, sample
from straightflow.solvers.auto import AUTO_TABLE, auto_choice

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "solvers-auto.md"


def documented_mapping() -> dict:
    """``{nfe: (solver, steps)}`` from the "The mapping" table of docs/solvers-auto.md."""
    text = DOC.read_text()
    section = text.split("## The mapping", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|", section, flags=re.M)
    assert rows, "no mapping rows in docs/solvers-auto.md"
    return {int(k): (s, int(st)) for k, s, st in rows}


@pytest.fixture(scope="module")
def field():
    return GaussianMixtureFlow.random(dim=3, n_components=8, seed=7)


def test_the_table_is_what_the_documentation_says():
    doc = documented_mapping()
    assert sorted(doc) == sorted(AUTO_TABLE) == list(range(2, 13))
    for k, (name, steps) in doc.items():
        assert AUTO_TABLE[k][0] == name and name in available()
        assert resolve_auto(k) == (name, steps, AUTO_TABLE[k][1])
    # the page and the module say how they were produced, and when
    text = DOC.read_text()
    assert "python -m benchmarks.solvers.auto_table" in text and re.search(r"Date: \d{4}-\d\d-\d\d", text)
    import straightflow.solvers.auto as mod

    assert "python -m benchmarks.solvers.auto_table" in mod.__doc__ and re.search(r"\d{4}-\d\d-\d\d", mod.__doc__)


@pytest.mark.parametrize("k", range(2, 13))
def test_sample_auto_uses_the_documented_solver_at_exact_nfe(field, k):
    name, steps = documented_mapping()[k]
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    res = sf.sample(field, x, solver="auto", steps=k)
    assert res.nfe == k and res.info["solver"] == name and res.info["steps"] == steps
    assert res.info["auto"] == {"budget": k, "solver": name, "steps": steps}
    ref = sample(field, x, solver=name, steps=steps)
    assert torch.equal(res.x, ref.x)


def test_budgets_above_the_table_use_the_largest_entry(field):
    name = AUTO_TABLE[max(AUTO_TABLE)][0]
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (13, 20, 31):
        res = sample(field, x, solver="Auto", steps=k)
        spec = get_solver(name)
        assert res.info["solver"] == name and res.nfe <= k
        assert res.nfe == spec.nfe(spec.steps_for_nfe(k))
        if spec.nfe(1) == spec.nfe(2) - spec.nfe(1):  # a solver with a constant cost per step meets it exactly
            assert res.nfe == k


def test_invert_auto_spends_the_budget(field):
    x1 = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = invert(field, x1, solver="auto", steps=6)
    assert res.nfe == 6 and res.info["solver"] == AUTO_TABLE[6][0]


@pytest.mark.parametrize("steps, match", [
    (None, "needs steps = the NFE budget"),
    (1, "integer >= 2"),
    (0, "integer >= 2"),
    (-3, "integer >= 2"),
    (2.5, "NFE budget"),
    ("4", "NFE budget"),
    (True, "NFE budget"),
])
def test_nonsense_budgets_are_refused(field, steps, match):
    with pytest.raises(ValueError, match=match):
        sample(field, (4, 3), solver="auto", steps=steps, seed=0)


def test_auto_refuses_what_it_was_not_measured_with(field):
    with pytest.raises(ValueError, match="uniform grid"):
        sample(field, (4, 3), solver="auto", steps=4, grid="cosine", seed=0)
    with pytest.raises(ValueError, match="uniform grid"):
        sample(field, (4, 3), solver="auto", steps=4, grid=torch.linspace(0, 1, 5), seed=0)
    with pytest.raises(ValueError, match="name a solver"):
        sample(field, (4, 3), solver="auto", steps=4, seed=0, order=2)
    with pytest.raises(ValueError, match="integer >= 2"):
        auto_choice(1)


def test_auto_is_offered_but_not_registered(capsys):
    assert AUTO in choices() and AUTO not in available()
    with pytest.raises(ValueError, match="not one solver"):
        get_solver("auto")
    with pytest.raises(ValueError, match=r"valid names: .*\bauto\b"):
        sample(lambda x, t: x, (2, 2), solver="nope", steps=4, seed=0)
    from straightflow.cli.main import main

    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("solvers:"))
    assert "auto" in line.split(": ", 1)[1].split(", ")


def test_the_measurement_script_writes_a_table_and_a_module(tmp_path):
    from benchmarks.solvers import auto_table

    mod, doc = tmp_path / "auto.py", tmp_path / "auto.md"
    assert auto_table.main(["--dims", "2", "--seeds", "5", "--nfe", "2-3", "--n", "16", "--out", str(tmp_path),
                            "--docs", str(doc), "--module", str(mod), "--quiet"]) == 0
    ns: dict = {}
    exec(compile(mod.read_text(), str(mod), "exec"), ns)
    assert sorted(ns["AUTO_TABLE"]) == [2, 3]
    text = doc.read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`([^`]+)`", text.split("## The mapping", 1)[1], flags=re.M)
    assert {int(k): s for k, s in rows[:2]} == {k: v[0] for k, v in ns["AUTO_TABLE"].items()}
    assert (tmp_path / "auto_table.md").is_file() and (tmp_path / "auto_table.json").is_file()
