"""What machine a figure was measured on: one line for every report and benchmark.

``machine_line()`` names the CPU (from ``/proc/cpuinfo`` where it exists), the torch thread
count and the torch / Python versions, plus the accelerator when one is in use, so that every
table the library writes says where it came from in the same words.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["cpu_model", "machine_line"]


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
