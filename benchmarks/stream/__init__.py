"""``straightflow bench stream``: the streaming pipeline and server under load.

:mod:`.settings`, :mod:`.throughput` (Stream Batch, RCFG, similarity filter), :mod:`.cost` (time
per call vs rows), :mod:`.load` (the server load test and its hostile client), :mod:`.page` (the
page in headless Chromium), :mod:`.report` (tables, plot) and :mod:`.suite` (the run, its flags).
"""
from __future__ import annotations

from .load import hostile_messages
from .settings import LARGE_SPEC, SECTIONS
from .suite import SUITE, main, run

__all__ = ["LARGE_SPEC", "SECTIONS", "SUITE", "hostile_messages", "main", "run"]
