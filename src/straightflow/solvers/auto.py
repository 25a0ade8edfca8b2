r"""The fixed solver ``solver="auto"`` uses at each NFE budget: measured, not chosen by hand.

Generated on 2026-12-08 (AMD EPYC, 1 torch threads, torch 2.13.0+cpu, Python 3.11.7) by::

    python -m benchmarks.solvers.auto_table --out docs/bench/auto --docs docs/solvers-auto.md --module \
        src/straightflow/solvers/auto.py

On 18 random Gaussian-mixture oracle fields (8 components, 2, 16 and 64 dimensions, spread and sharp
families, see ``benchmarks/solvers/auto_table.py``), every deterministic fixed-step solver ran at every exact
NFE; per NFE, the solver with the lowest median ratio of its endpoint RMSE (against a float64 dopri5
reference, rtol 1e-10) to the best solver's on the same field. ``docs/solvers-auto.md`` is the table.

:data:`AUTO_TABLE` maps an NFE budget to ``(solver name, solver options)``; :func:`auto_choice` is the lookup
(budgets above the table use its largest entry; below it, an error).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

AUTO_TABLE: Dict[int, Tuple[str, Dict[str, Any]]] = {
    2: ('midpoint', {}),
    3: ('deis-pc', {}),
    4: ('deis-pc', {}),
    5: ('ab2', {}),
    6: ('ab3', {}),
    7: ('ab3', {}),
    8: ('ab3', {}),
    9: ('ab3', {}),
    10: ('ab3', {}),
    11: ('ab3', {}),
    12: ('ab3', {}),
}


def auto_choice(nfe: int) -> Tuple[str, Dict[str, Any]]:
    """``(solver, options)`` for an NFE budget: the measured entry, or the largest entry's above the table."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < min(AUTO_TABLE):
        raise ValueError(f'solver="auto" takes steps = the NFE budget, an integer >= {min(AUTO_TABLE)}; '
                         f"got {nfe!r}")
    name, options = AUTO_TABLE[min(int(nfe), max(AUTO_TABLE))]
    return name, dict(options)
