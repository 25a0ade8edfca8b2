"""Benchmark suites (``straightflow bench NAME``), each on the small harness in :mod:`.harness`.

This package lives beside the library, in the source checkout, and is not part of the installed
wheel. It uses only straightflow's public API; nothing in the library imports it (the command
line's ``bench`` launcher finds it in the checkout and imports it by name). Importing it registers
every suite in :data:`SUITES`, in the fixed order of the table below.
"""
from __future__ import annotations

from . import align, control, images, nf, solvers, straighten, stream, train  # noqa: F401  (each registers its suite)
from .harness import SUITES, Suite, run_suite

__all__ = ["SUITES", "Suite", "run_suite", "available"]


def available() -> list:
    """Names accepted by ``straightflow bench NAME``."""
    return SUITES.names()
