"""Where the benchmarks live: beside the library (``benchmarks/``), on its public API, never in the wheel.

Every module under ``benchmarks/`` and ``research/`` imports; the suites import no private name of
straightflow; setuptools' package discovery (as ``pyproject.toml`` configures it) finds the library
only; ``straightflow bench`` finds the suites from a checkout and says in one line what to do
outside one; every suite's report carries its header through the harness ``Report``.
"""
from __future__ import annotations

import ast
import importlib
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIVE = ("benchmarks", "research")  # folders of Python beside the library


def _modules(folder: str) -> list:
    out = []
    for p in sorted((ROOT / folder).rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def test_the_suites_are_beside_the_library_not_inside():
    assert (ROOT / "benchmarks" / "__init__.py").is_file()
    assert not (ROOT / "src" / "straightflow" / "bench").exists()


@pytest.mark.parametrize("name", [m for f in LIVE for m in _modules(f) if (ROOT / f / "__init__.py").is_file()])
def test_every_module_imports(name):
    importlib.import_module(name)


def test_loose_scripts_import():
    """Scripts in a folder that is no package (``research/``, if it holds any) import too, from their folder."""
    for folder in LIVE:
        if (ROOT / folder / "__init__.py").is_file():
            continue
        for p in sorted((ROOT / folder).glob("*.py")):
            sys.path.insert(0, str(p.parent))
            try:
                importlib.import_module(p.stem)
            finally:
                sys.path.remove(str(p.parent))


def _private_uses(path: Path, root: Path = ROOT) -> list:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "straightflow":
            bad += [f"{path.relative_to(root)}:{node.lineno} from {node.module} import {a.name}"
                    for a in node.names if any(p.startswith("_") for p in node.module.split(".") + [a.name])]
        elif isinstance(node, ast.Import):
            bad += [f"{path.relative_to(root)}:{node.lineno} import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "straightflow" and any(p.startswith("_") for p in a.name.split("."))]
    return bad


def test_benchmarks_use_only_the_public_api():
    bad = [b for p in sorted((ROOT / "benchmarks").rglob("*.py")) for b in _private_uses(p)]
    assert not bad, "benchmarks import private names of the library (make them public or move them):\n" + "\n".join(bad)


def test_the_public_api_check_catches_a_private_import(tmp_path):
    p = tmp_path / "suite.py"
    p.write_text("from straightflow.solvers import _private, sample\nimport straightflow._x\n"
                 "from straightflow._y import z\nfrom straightflow import sample\nfrom ._local import helper\n")
    bad = _private_uses(p, tmp_path)
    assert len(bad) == 3 and all(b.startswith("suite.py:") for b in bad), bad


def _discovered_packages() -> list:
    """The packages setuptools puts in the wheel, found as ``[tool.setuptools.packages.find]`` says."""
    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "packages" in cfg and set(cfg["packages"]) == {"find"}, "packages are found by [tool.setuptools.packages.find]"
    find = cfg["packages"]["find"]
    where = find.get("where", ["."])
    assert len(where) == 1
    return find_packages(where=str(ROOT / where[0]), include=find.get("include", ("*",)), exclude=find.get("exclude", ()))


def test_the_wheel_holds_the_library_only():
    pkgs = _discovered_packages()
    assert "straightflow" in pkgs and "straightflow.cli" in pkgs and "straightflow.solvers" in pkgs
    assert all(p == "straightflow" or p.startswith("straightflow.") for p in pkgs), pkgs
    assert not [p for p in pkgs if "bench" in p.split(".") or p.startswith("benchmarks")], pkgs
    assert not [p for p in pkgs if p.split(".")[0] in LIVE]


def test_the_launcher_finds_the_checkout(tmp_path, monkeypatch):
    from straightflow.cli import bench as launcher

    assert launcher.find_checkout([ROOT / "tests"]) == ROOT
    monkeypatch.chdir(tmp_path)  # from elsewhere: the package's own source location still leads to the checkout
    assert launcher.find_checkout() == ROOT
    assert launcher.find_checkout([tmp_path]) is None
    mod = launcher.load_benchmarks()
    assert mod.SUITES.names() == launcher.suite_names()
    assert {"solvers", "train", "straighten", "stream", "control", "images", "align"} <= set(launcher.suite_names())


def test_outside_a_checkout_bench_says_how_to_get_the_suites(tmp_path, monkeypatch, capsys):
    from straightflow.cli import bench as launcher, main

    monkeypatch.delitem(sys.modules, "benchmarks")
    monkeypatch.setattr(launcher, "find_checkout", lambda starts=None: None)
    assert main(["bench", "train", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "git clone" in err and "benchmarks/" in err
    assert launcher.suite_names() == []


def test_every_suite_renders_its_report_through_the_harness():
    """The header (title, command, date, machine, timing protocol) cannot be skipped: every suite that
    writes a report builds a harness ``Report``; no suite writes a title line of its own."""
    from benchmarks.harness import Report, Timing

    r = Report("T", "straightflow bench x", Timing(1, warmup=1, repeats=5), quick=True).add("body")
    md = r.render()
    for word in ("# T", "Command: `straightflow bench x`", "Date:", "Machine:", "Timing:", "1 warm-up", "median of 5",
                 "QUICK MODE", "body"):
        assert word in md, word
    assert "none quoted" in Report("T", "c", Timing(2, repeats=0)).render()
    with pytest.raises(ValueError):
        Report("T", "", Timing(1))
    with pytest.raises(ValueError):
        Report("T", "c", None)
    suites = [p for p in (ROOT / "benchmarks").rglob("*.py") if "register_suite(" in p.read_text()
              and p.name != "harness.py"]
    assert len(suites) == 8  # + nf
    for p in (ROOT / "benchmarks").rglob("*.py"):
        if p.name == "harness.py":
            continue
        text = p.read_text()
        assert '"# ' not in text and "f\"# " not in text, f"{p.relative_to(ROOT)} writes a report title itself"
    for p in suites:
        pkg = p.parent if p.name == "suite.py" else None
        text = "".join(q.read_text() for q in (pkg.glob("*.py") if pkg else [p]))
        assert "Report(" in text, f"{p.relative_to(ROOT)} does not build a harness Report"
