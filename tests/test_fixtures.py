"""The test suite's own hygiene: no fixture shadows another (a module fixture with the name of a conftest
one silently replaces it there, so a test can run on another object than the reader expects)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_fixture(dec: ast.expr) -> bool:
    node = dec.func if isinstance(dec, ast.Call) else dec
    return ((isinstance(node, ast.Attribute) and node.attr == "fixture")
            or (isinstance(node, ast.Name) and node.id == "fixture"))


def fixture_names() -> dict:
    where = defaultdict(list)
    for f in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and any(_is_fixture(d) for d in node.decorator_list)):
                where[node.name].append(f"{f.relative_to(TESTS).as_posix()}:{node.lineno}")
    return where


def test_no_fixture_shadows_a_conftest_fixture():
    """A module may reuse a name another module uses for its own fixture, but never one of conftest's."""
    where = fixture_names()
    shared = {name for name, places in where.items() if any(p.startswith("conftest.py:") for p in places)}
    assert "oracle" in shared and "noise" in shared  # the checker sees conftest's fixtures
    twice = {name: where[name] for name in shared if len(where[name]) > 1}
    assert not twice, f"fixtures that shadow conftest's (rename the module's one): {twice}"


def test_no_fixture_name_is_defined_twice_in_one_file():
    where = fixture_names()
    twice = {name: places for name, places in where.items()
             if len({p.split(":")[0] for p in places}) < len(places)}
    assert not twice, f"fixtures defined twice in one file: {twice}"


def test_timeout_and_slow_marker_are_configured(request):
    """pytest-timeout bounds every test (generously), and the slow tests are marked but never deselected
    by the configuration: ``make test`` runs them."""
    import shlex
    import tomllib

    assert float(request.config.getini("timeout")) >= 600  # pytest-timeout is active and configured
    opts = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in opts["markers"])
    assert "-m" not in shlex.split(opts.get("addopts", "")) and "slow" not in opts.get("addopts", "")
    make = (TESTS.parent / "Makefile").read_text()
    assert "not slow" not in make
    readme_test = ast.parse((TESTS / "test_readme.py").read_text())
    marked = {f.name for f in readme_test.body if isinstance(f, ast.FunctionDef)
              and any(ast.unparse(d) == "pytest.mark.slow" for d in f.decorator_list)}
    assert "test_readme_command_lines_run_as_written" in marked
