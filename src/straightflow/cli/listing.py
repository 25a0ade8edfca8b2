"""Every name a user can pass, by family, as ``straightflow list`` prints it: the same registries
the library, the command line's help and the error messages read."""
from __future__ import annotations

from typing import Dict, List

from .. import align, coupling, data, grids, losses, metrics, models, optimize, paths, solvers, time as sftime
from ..control import guidance, inverse, operators, rewards, scaling
from ..images import fast
from ..solvers.sde import DIFFUSIONS
from ..stream import pipeline
from .bench import suite_names


def families() -> Dict[str, List[str]]:
    """``{family: names}`` of every registered family."""
    return {
        "data sets": data.available(),
        "models": models.available(),
        "paths": paths.available(),
        "time distributions": sftime.available(),
        "losses": losses.available(),
        "loss weightings": losses.WEIGHTINGS.names(),
        "couplings": coupling.available(),
        "solvers": solvers.choices(),  # auto included: sample resolves it per NFE
        "grids": grids.available(),
        "SDE diffusions": list(DIFFUSIONS),
        "metrics": metrics.available(),
        "calibration kinds": optimize.calibration_kinds(),
        "guidance schedules": guidance.GUIDANCE_SCHEDULES.names(),
        "operators": operators.available(),
        "inverse methods": inverse.available(),
        "rewards": rewards.REWARDS.names(),
        "search methods": scaling.available(),
        "alignment methods": align.available(),
        "fast samplers": fast.available(),
        "stream rcfg modes": pipeline.available(),
        "benchmark suites": suite_names(),  # empty outside a source checkout
    }
