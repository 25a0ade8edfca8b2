"""The benchmark harness: a suite is a name, its arguments and a run function; the rest is shared.

Every suite module registers one :class:`Suite` in :data:`SUITES` (so ``straightflow bench``,
``straightflow list`` and the error for an unknown suite name list the same names) and keeps a
``main(argv)`` that runs it through :func:`run_suite`. What the suites share lives here: the
common flags (``--out``, ``--threads``, ``--quick``), the command line as the user typed it,
the date-and-machine line, Markdown tables and number formatting, median timing with warm-up,
atomic report files, and the train-once-and-cache helper for the models a suite measures.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shlex
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import checkpoint, runs
from ..io import atomic_write_bytes
from ..registry import Registry
from ..system import machine_line
from ..train import MAX_STEPS_ENV, max_steps_cap

__all__ = ["Suite", "SUITES", "register_suite", "run_suite", "command_line", "header", "dated_machine", "table",
           "fmt", "ratio", "median_time", "write_report", "cached_model", "log_to", "show_defaults", "HelpFormatter"]


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with every option's default (unless its help already names it, it is None, or the
    option is a switch); descriptions keep their own line breaks."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" in h.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or not action.option_strings):
            return h
        return h + " (default: %(default)s)"

    def _fill_text(self, text, width, indent):  # indented lines (tables) stay as written, others wrap
        return "\n".join(indent + part if part[:1].isspace() or not part.strip()
                         else argparse.HelpFormatter._fill_text(self, part, width, indent)
                         for part in text.split("\n"))


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` (and its sub-commands) print every option's default in ``--help``, options
    without a help text included."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif (action.option_strings and not action.help and action.nargs != 0
              and action.default not in (None, argparse.SUPPRESS)):
            action.help = "(default: %(default)s)"
    return parser


@dataclass(frozen=True)
class Suite:
    """A benchmark suite: ``arguments(parser)`` adds its own flags, ``run(args) -> int`` runs it.

    ``args`` also carries the common ``out`` (a created ``Path``), ``threads``, ``quick`` and
    ``command`` (the command line that reproduces the run).
    """

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    doc: str = ""


SUITES: Registry = Registry("benchmark suite")
HEARTBEAT_S = 30.0  # seconds between "still running" lines


def register_suite(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None],
                   run: Callable[[argparse.Namespace], int], doc: str = "") -> Suite:
    s = Suite(name, help, arguments, run, doc)
    SUITES.register(name)(s)
    return s


def parser(suite: Suite) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"straightflow bench {suite.name}", description=suite.doc or suite.help)
    p.add_argument("--out", default="bench_out", help="output directory (Markdown, JSON, plots)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (timings: 1)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds to minutes) to check the pipeline")
    suite.arguments(p)
    return show_defaults(p)


def command_line(name: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run: ``straightflow bench NAME ARGS``."""
    return " ".join(["straightflow", "bench", name, *(shlex.quote(str(a)) for a in argv)])


def run_suite(name: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` with the suite's flags, set the thread count, create ``--out`` and run it."""
    suite = SUITES.get(name)
    argv = [] if argv is None else [str(a) for a in argv]
    a = parser(suite).parse_args(argv)
    if max_steps_cap() is not None and not a.quick:  # the smoke-test knob: every suite in its quick form
        print(f"[bench {suite.name}] ${MAX_STEPS_ENV} is set: running --quick", flush=True)
        a.quick = True
    if a.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    a.out = Path(a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    a.command = command_line(suite.name, argv)
    log = log_to(suite.name)
    log(f"started ({'quick' if a.quick else 'full'} run, report in {a.out}); a line every "
        f"{HEARTBEAT_S:.0f} s while it runs")
    t0 = time.perf_counter()
    stop = threading.Event()

    def heartbeat() -> None:  # some sections compute for minutes without a line of their own
        while not stop.wait(HEARTBEAT_S):
            log(f"still running ({time.perf_counter() - t0:.0f} s)")

    beat = threading.Thread(target=heartbeat, name=f"bench-{suite.name}-heartbeat", daemon=True)
    beat.start()
    try:
        code = int(suite.run(a) or 0)
    finally:
        stop.set()
        beat.join()
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return code


# ----------------------------------------------------------------------------- report text
def dated_machine() -> str:
    """``date YYYY-MM-DD; <machine line>``."""
    return f"date {_dt.date.today().isoformat()}; {machine_line()}"


def header(title: str, command: str, quick: bool = False) -> List[str]:
    """The first lines of every report: title, the command, the date and the machine."""
    return [f"# {title}", "", f"Command: `{command}`  ", f"Date: {_dt.date.today().isoformat()}  ",
            f"Machine: {machine_line()}", ""] + (["QUICK MODE: tiny settings, numbers not meaningful.", ""] if quick else [])


def fmt(v: Any, nd: int = 2) -> str:
    """A number with ``nd`` decimals (none from 1000 on); ``n/a`` for None, NaN, inf or a non-number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:.0f}"


def ratio(v: Optional[float], nd: int = 2) -> str:
    """``1.23x`` (``n/a`` for a missing value)."""
    s = fmt(v, nd)
    return s if s == "n/a" else s + "x"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A Markdown table; ``align`` a string of ``l``/``r`` per column (default: left)."""
    align = align or "l" * len(headers)
    rule = "|" + "|".join("---:" if c == "r" else "---" for c in align) + "|"
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", rule]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- timing and files
def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> Tuple[float, List[float]]:
    """``(median seconds, all seconds)`` of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones;
    ``clock`` is wall time by default (``time.process_time`` for CPU seconds)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, repeats)):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return statistics.median(ts), ts


def _json_default(o: Any) -> Any:
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def write_report(out: Path, stem: str, markdown: str, data: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``out/stem.md`` (and ``out/stem.json`` when ``data`` is given) atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{stem}.md", markdown.encode())
    if data is not None:
        atomic_write_bytes(out / f"{stem}.json", json.dumps(data, indent=2, default=_json_default).encode())
    return out / f"{stem}.md"


def log_to(name: str, enabled: bool = True) -> Callable[[str], None]:
    """A ``log(msg)`` printing ``[bench NAME] msg`` (flushed), or doing nothing."""
    def log(msg: str) -> None:
        if enabled:
            print(f"[bench {name}] {msg}", flush=True)
    return log


def cached_model(out: Path, name: str, recipe: Mapping[str, Any], run: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None, progress: bool = False):
    """``(model, run directory, how)``: the given ``run`` directory, else ``recipe`` (the keyword
    arguments of :func:`straightflow.runs.train_run`) trained once into ``out/runs/NAME`` and reused
    afterwards (:func:`straightflow.runs.cached_run`)."""
    if run:
        return checkpoint.load(run), str(run), f"given run `{run}`"
    t0 = time.perf_counter()
    said = []
    d = runs.cached_run(Path(out) / "runs" / name, recipe, progress=progress,
                        log=lambda msg: (said.append(msg), log(msg) if log else None))
    how = (f"trained now ({recipe['steps']} steps, {time.perf_counter() - t0:.0f} s)" if said
           else f"cached ({recipe['steps']} training steps)")
    return checkpoint.load(d), str(d), how
