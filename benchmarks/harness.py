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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from straightflow import checkpoint, runs
from straightflow.io import atomic_write_bytes
from straightflow.registry import Registry
from straightflow.system import machine_line
from straightflow.cli.help import HelpFormatter, show_defaults
from straightflow.train import max_steps_cap

__all__ = ["Suite", "SUITES", "register_suite", "run_suite", "command_line", "dated_machine", "table",
           "fmt", "ratio", "median_time", "Report", "Timing", "write_report", "cached_model", "log_to", "show_defaults", "HelpFormatter"]


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
    p.add_argument("--quick", action="store_true",
                   help="tiny settings that check the pipeline, not its figures (most suites take a few "
                   "minutes on 2 CPU cores; `bench solvers --quick` about 8)")
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
        print(f"[bench {suite.name}] a smoke step cap is set: running --quick", flush=True)
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
@dataclass(frozen=True)
class Timing:
    """How a report's timings were taken: ``threads`` torch threads, ``warmup`` untimed runs, then
    ``statistic`` (the median) over ``repeats`` timed runs on ``clock``; ``repeats=0``: the report
    quotes no timings. ``note`` adds what is particular to the suite (interleaving, units, ...)."""

    threads: int
    warmup: int = 1
    repeats: int = 3
    statistic: str = "median"
    clock: str = "wall clock (time.perf_counter)"
    note: str = ""

    def line(self) -> str:
        if self.repeats < 1:
            s = f"Timing: none quoted (torch.set_num_threads({self.threads}))."
        else:
            s = (f"Timing: torch.set_num_threads({self.threads}); {self.warmup} warm-up run(s), then the "
                 f"{self.statistic} of {self.repeats} repeats, {self.clock}.")
        return s + (f" {self.note}" if self.note else "")

    def as_dict(self) -> dict:
        return {"threads": self.threads, "warmup": self.warmup, "repeats": self.repeats,
                "statistic": self.statistic, "clock": self.clock, "note": self.note}


@dataclass
class Report:
    """A suite's Markdown report: the header every report carries (title, command, date, machine,
    timing protocol, quick-mode warning) followed by the suite's own lines.

    Every suite builds one and writes it with :meth:`write` (or renders it with :meth:`render`), so
    the header cannot be left out. ``machine_note`` adds to the machine line (load average, ...).
    """

    title: str
    command: str
    timing: Timing
    quick: bool = False
    machine_note: str = ""
    date: str = field(default_factory=lambda: _dt.date.today().isoformat())
    machine: str = field(default_factory=machine_line)
    lines: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.title or not self.command:
            raise ValueError("a report needs a title and the command that reproduces it")
        if not isinstance(self.timing, Timing):
            raise ValueError(f"a report's timing protocol is a harness.Timing, got {type(self.timing).__name__}")

    def add(self, *lines: str) -> "Report":
        """Append lines (each may hold several); returns the report."""
        self.lines.extend(lines)
        return self

    def header_lines(self) -> List[str]:
        m = f"Machine: {self.machine}" + (f"; {self.machine_note}" if self.machine_note else "")
        return ([f"# {self.title}", "", f"Command: `{self.command}`  ", f"Date: {self.date}  ", m + "  ",
                 self.timing.line(), ""]
                + (["QUICK MODE: tiny settings, numbers not meaningful.", ""] if self.quick else []))

    def render(self) -> str:
        """The Markdown text: the header, then the suite's lines; ends with one newline."""
        return "\n".join(self.header_lines() + list(self.lines)).rstrip("\n") + "\n"

    def meta(self) -> dict:
        """The header as data (stored as ``report`` in the suite's JSON)."""
        return {"title": self.title, "command": self.command, "date": self.date, "machine": self.machine,
                "machine_note": self.machine_note, "quick": self.quick, "timing": self.timing.as_dict()}

    def write(self, out: Path, stem: str, data: Optional[Mapping[str, Any]] = None) -> Path:
        """``out/stem.md`` (and ``out/stem.json`` with ``data`` and the header as ``report``)."""
        return write_report(out, stem, self.render(), None if data is None else {**data, "report": self.meta()})


def dated_machine() -> str:
    """``date YYYY-MM-DD; <machine line>``."""
    return f"date {_dt.date.today().isoformat()}; {machine_line()}"


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
