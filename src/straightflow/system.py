"""The machine: which device to run on, and what machine a figure was measured on.

``resolve_device(spec)`` turns ``"auto"`` into the best available device (CUDA, then Apple MPS,
then the CPU) and checks an explicit one (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) with a
clear error when it is not usable; the command line's ``--device`` and the library's ``device=``
arguments all go through it. ``machine_line()`` names the CPU (from ``/proc/cpuinfo`` where it
exists), the torch thread count and the torch / Python versions, plus the accelerator when one is
in use, so that every table the library writes says where it came from in the same words.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import Iterator, Union

import torch

__all__ = ["cpu_model", "machine_line", "resolve_device", "DEVICE_CHOICES", "native_output_silenced"]

DEVICE_CHOICES = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(spec: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA if available, else MPS, else the CPU; otherwise the named device,
    checked to exist (ValueError saying what is available when it does not)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        d = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {spec!r}: {e}; accepted: {DEVICE_CHOICES}") from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(spec)!r} requested but CUDA is not available "
                             "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(spec)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif d.type == "mps":
        if not _mps_available():
            raise ValueError(f"device {str(spec)!r} requested but MPS is not available; use 'cpu' or 'auto'")
    elif d.type != "cpu":
        try:
            torch.empty(1, device=d)
        except Exception as e:
            raise ValueError(f"device {str(spec)!r} is not usable: {e}") from e
    return d


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line() -> str:
    """``"<CPU>, <n> torch threads, torch <v>, Python <v>"`` (+ the CUDA device when available)."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}{gpu}")


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Send what native code writes to the process's stdout/stderr (file descriptors 1 and 2) to
    /dev/null while the block runs, e.g. the profiler's start/stop lines that torch's C++ side
    prints; Python's own streams are flushed first and restored after."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass
    saved = []
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover - no /dev/null: leave the output alone
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(null, fd)
            except OSError:
                pass
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)
