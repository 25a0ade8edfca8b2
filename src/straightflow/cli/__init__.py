"""The ``straightflow`` command line (``main``); nothing in the library imports this package.

One module per command family (:mod:`.core`, :mod:`.demo`, :mod:`.bench`, :mod:`.straighten`,
:mod:`.control`, :mod:`.images`, :mod:`.stream`), shared flag groups in :mod:`.flags`, and the
fixed command table in :mod:`.main`.
"""
from __future__ import annotations

from .demo import run_demo
from .main import COMMANDS, build_parser, main

__all__ = ["main", "build_parser", "run_demo", "COMMANDS"]
