"""``straightflow bench solvers``: solver accuracy at equal NFE against the peer libraries.

:mod:`.settings` (fields, NFE lists, tolerances), :mod:`.fields` (the velocity fields and their
reference), :mod:`.peers` (the peer libraries' samplers), :mod:`.methods` (straightflow's solvers,
grids, BOSS and the searched schedule at an exact NFE), :mod:`.calibrated` (the calibration kinds),
:mod:`.report` (Markdown, summaries, plots) and :mod:`.suite` (the run and its command line).
"""
from __future__ import annotations

from .methods import sf_steps_for_nfe
from .peers import Peer, make_peers
from .settings import DEFAULT_FIELDS, DEFAULT_NFES, QUICK_NFES
from .suite import SUITE, bench_solvers, main, run

__all__ = ["DEFAULT_FIELDS", "DEFAULT_NFES", "QUICK_NFES", "Peer", "SUITE", "bench_solvers", "make_peers", "main",
           "run", "sf_steps_for_nfe"]
