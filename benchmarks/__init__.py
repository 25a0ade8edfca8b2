"""Benchmark suites (``straightflow bench NAME``), each on the small harness in :mod:`.harness`.

Nothing in the library imports this package; it imports the library. Importing it registers
every suite in :data:`SUITES`, in the fixed order of the table below.
"""
from __future__ import annotations

from . import align, control, images, solvers, straighten, stream, train  # noqa: F401  (each registers its suite)
from .harness import SUITES, Suite, run_suite

__all__ = ["SUITES", "Suite", "run_suite", "available"]


def available() -> list:
    """Names accepted by ``straightflow bench NAME``."""
    return SUITES.names()
