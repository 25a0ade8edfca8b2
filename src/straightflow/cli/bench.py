"""``straightflow bench SUITE [options]``: run a benchmark suite (see ``straightflow bench SUITE --help``)."""
from __future__ import annotations

import argparse

from ..bench import SUITES, run_suite


def cmd_bench(a: argparse.Namespace) -> int:
    return run_suite(a.suite, a.args)


def register(sub) -> None:
    lines = [f"  {name:<11} {SUITES.get(name).help}" for name in SUITES.names()]
    b = sub.add_parser("bench", help="benchmark suites that write Markdown tables and plots",
                       description="Run a benchmark suite; it writes Markdown, JSON and plots to --out.\n\nsuites:\n"
                       + "\n".join(lines) + "\n\nEvery suite takes --out, --threads and --quick; "
                       "`straightflow bench SUITE --help` lists its own options.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("suite", help=f"one of: {', '.join(SUITES.names())}")
    b.add_argument("args", nargs=argparse.REMAINDER, help="the suite's options")
    b.set_defaults(fn=cmd_bench)
