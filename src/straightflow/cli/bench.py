"""``straightflow bench SUITE [options]``: a thin launcher for the benchmark suites.

The suites are not part of the installed package: they live in ``benchmarks/`` beside the library in
a source checkout (``docs/architecture.md``, "Where benchmarks live"). The launcher finds that folder
(walking up from the current directory, then from this package's source location, to the first
folder holding ``benchmarks/__init__.py``), imports it and runs the suite with the suite's own flags.
Outside a checkout it says in one line how to get them. Nothing else in the library imports the
benchmarks; this module does it by name, at run time.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable, List, Optional

__all__ = ["find_checkout", "load_benchmarks", "suite_names", "NOT_FOUND"]

PACKAGE = "benchmarks"
NOT_FOUND = ("the benchmark suites are not installed with the package: they live in benchmarks/ of the source "
             "checkout (git clone the straightflow repository and run `straightflow bench` inside it)")


def _candidates(starts: Iterable[Path]) -> List[Path]:
    out: List[Path] = []
    for start in starts:
        for d in [start, *start.parents]:
            if d not in out:
                out.append(d)
    return out


def find_checkout(starts: Optional[Iterable[Path]] = None) -> Optional[Path]:
    """The first folder holding ``benchmarks/__init__.py``, walking up from each of ``starts``
    (default: the current directory, then this package's source location); None when there is none."""
    if starts is None:
        starts = [Path.cwd(), Path(__file__).resolve().parent]
    for d in _candidates(Path(s).resolve() for s in starts):
        if (d / PACKAGE / "__init__.py").is_file():
            return d
    return None


def load_benchmarks(starts: Optional[Iterable[Path]] = None) -> ModuleType:
    """Import the checkout's ``benchmarks`` package (which registers every suite); ``ValueError``
    with :data:`NOT_FOUND` outside a checkout."""
    loaded = sys.modules.get(PACKAGE)
    if loaded is not None and hasattr(loaded, "SUITES"):
        return loaded
    root = find_checkout(starts)
    if root is None:
        raise ValueError(NOT_FOUND)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    mod = importlib.import_module(PACKAGE)
    if not hasattr(mod, "SUITES"):
        raise ValueError(f"{getattr(mod, '__file__', PACKAGE)} is not straightflow's benchmarks package; {NOT_FOUND}")
    return mod


def suite_names() -> List[str]:
    """The suites ``straightflow bench`` runs here (empty outside a checkout)."""
    try:
        return load_benchmarks().SUITES.names()
    except (ValueError, ImportError):
        return []


def cmd_bench(a: argparse.Namespace) -> int:
    return load_benchmarks().run_suite(a.suite, a.args)


def register(sub) -> None:
    try:
        suites = load_benchmarks().SUITES
        names = suites.names()
        lines = "suites:\n" + "\n".join(f"  {name:<11} {suites.get(name).help}" for name in names)
    except ValueError:
        names, lines = [], NOT_FOUND
    except ImportError as e:  # a broken suite must not break the other commands; `bench` itself shows the error
        names, lines = [], f"benchmarks/ could not be imported: {e}"
    b = sub.add_parser("bench", help="benchmark suites that write Markdown tables and plots (source checkout)",
                       description="Run a benchmark suite; it writes Markdown, JSON and plots to --out.\n\n"
                       + lines + "\n\nEvery suite takes --out, --threads and --quick; "
                       "`straightflow bench SUITE --help` lists its own options.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("suite", help=f"one of: {', '.join(names)}" if names else "a suite of benchmarks/ (source checkout)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="the suite's options")
    b.set_defaults(fn=cmd_bench)
