"""The ``straightflow`` command: a fixed table of command families, each a module with ``register(sub)``.

Every choice (data set, model, path, time distribution, loss, coupling, solver, grid, metric,
method, suite) is read from the registries the library uses, so ``--help``, ``straightflow list``
and the error messages name exactly what works. Library errors (bad names, broken run
directories, bad values) are printed as one ``error: ...`` line with exit status 2. Ctrl-C or SIGTERM
during a training loop or pair generation checkpoints at the step it reached and prints one line,
"interrupted at step N of M; rerun the same command to resume", with exit status 130 (no traceback).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import sys
import warnings
from typing import List, Optional

import torch

from ..checkpoint import CheckpointError, UnfinishedRunWarning, straightflow_version
from ..registry import UnknownNameError
from ..train import Interrupted, max_steps
from . import align, bench, calibrate, control, core, demo, flags, hub, images, straighten, stream
from .help import show_defaults

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C / SIGTERM (128 + SIGINT, as shells report)

# (module, its register function), in the order ``--help`` lists the commands
COMMANDS = (
    core.register,        # train, sample, invert, eval
    calibrate.register,   # calibrate
    demo.register,        # demo
    bench.register,       # bench SUITE
    straighten.register,  # pairs, reflow, distill, meanflow
    control.register,     # edit, restore, search
    align.register,       # align, policy
    images.register,      # latent, generate
    stream.register,      # serve, stream
    hub.register,         # publish
    core.register_list,   # list
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="straightflow", description="Rectified flow and flow matching: train, straighten, "
                                "sample fast, control, stream and measure.")
    p.add_argument("--version", action="version", version=f"straightflow {straightflow_version()} (torch "
                   f"{torch.__version__}, Python {platform.python_version()})")
    p.add_argument("--threads", type=flags.positive_int, default=None,
                   help="torch intra-op threads, >= 1 (default: torch's own choice)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="smoke test: cap every training run at N steps (also $STRAIGHTFLOW_MAX_STEPS); not a real run")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return show_defaults(p)


def out_of_memory(e: BaseException) -> Optional[str]:
    """One line for an allocation failure (CPU or GPU), else None: what was asked and what to change."""
    msg = str(e)
    low = msg.lower()
    if not ("out of memory" in low or "can't allocate memory" in low or "cannot allocate memory" in low):
        return None
    m = re.search(r"allocate ([\d.]+) ?(bytes|[KMGT]iB|[KMGT]B)", msg)
    asked = ""
    if m:
        size, unit = float(m.group(1)), m.group(2)
        if unit == "bytes":
            size, unit = size / 2 ** 30, "GiB"
        asked = f" (an allocation of {size:.3g} {unit})"
    return (f"out of memory{asked}: ask for less at once, e.g. a smaller --n, --batch-size or --batch, or "
            "another --device")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    a.command = "straightflow " + shlex.join(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if getattr(a, "log", None) == "wandb":  # W&B works offline unless the user's environment says otherwise
        os.environ.setdefault("WANDB_MODE", "offline")
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line  # library warnings (an unfinished run, ...) as one line each
        warnings.simplefilter("always", UnfinishedRunWarning)
        try:
            with max_steps(flags.smoke_cap(a), announce="straightflow"):  # the smoke cap, said once, here
                return int(a.fn(a) or 0)
        except (UnknownNameError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            line = out_of_memory(e)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 2
        except Interrupted as e:  # a loop stopped at a step boundary and wrote its checkpoint there
            print(e, file=sys.stderr, flush=True)
            return INTERRUPTED
        except KeyboardInterrupt:  # outside a loop (loading, evaluating): what is on disk is every checkpoint made
            print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
            return INTERRUPTED
