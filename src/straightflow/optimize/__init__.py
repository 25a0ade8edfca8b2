"""Optimised sampling schedules: BOSS time grids, per-step solver search, cached calibrations.

Three tools, all driven by one accurate *reference trajectory* computed on a calibration batch:

* :func:`boss_grid` -- Bellman Optimal Step-size Straightening (Nguyen et al. 2023): the time
  grid for a given solver and NFE that minimises the summed one-step (local) error along the
  reference trajectory, found exactly by dynamic programming over a fine candidate set.
* :func:`search_schedule` -- a search over (time grid, per-step solver) under an exact NFE budget
  (in the spirit of S^3 / USF, "A Unified Sampling Framework for Solver Searching"), scored by the
  endpoint RMSE against the reference on the calibration batch and reported on a held-out batch.
  Schedules run with :func:`run_schedule` (true NFE counted).
* :class:`Calibration` + :func:`save_calibration` / :func:`load_calibration` /
  :func:`calibrate` / :func:`calibrated_grid` -- results stored beside a model in
  ``run_dir/calibrations/<kind>-<solver>-nfe<k>.json`` together with a fingerprint of the
  weights, and reused (without a single model evaluation) while the weights are unchanged.

Using a BOSS grid: the grid registry's functions take no model, so pass the grid explicitly::

    g = boss_grid(model, (256, 2), nfe=6, solver="euler")          # float64, steps + 1 times
    out = sf.sample(model, noise, solver="euler", grid=g)            # steps come from the grid

    g = calibrated_grid("runs/x", "euler", nfe=6)                    # computed once, then cached

Conventions: time runs from noise (t = 0) to data (t = 1); RMSE is over all elements,
``sqrt(mean((x - x_ref(1))^2))``; the reference is classic RK4 on ``fine_steps`` uniform steps.

Modules: :mod:`.base` (shared helpers), :mod:`.reference` (the RK4 reference trajectory),
:mod:`.boss` (cost table, Bellman DP, BOSS grid), :mod:`.search` (running and searching
per-step schedules), :mod:`.calibration` (the stored record, the registry of calibration kinds,
files and fingerprints), :mod:`.calibrated` (``calibrate`` and the built-in kinds ``boss`` and
``search``). :func:`calibration_kinds` lists the kinds; a new one is one function registered
with :func:`register_calibration_kind`.
"""
from __future__ import annotations

from .base import NoiseLike  # noqa: F401
from .boss import bellman_path, boss_cost_table, boss_grid
from .calibrated import calibrate, calibrated_grid, calibrated_schedule
from .calibration import (  # noqa: F401
    CALIBRATION_DIR,
    CALIBRATION_KINDS,
    MODEL_FILE,
    Calibration,
    CalibrationKind,
    CalibrationMismatch,
    CalibrationRequest,
    calibration_kinds,
    calibration_path,
    load_calibration,
    model_fingerprint,
    register_calibration_kind,
    save_calibration,
    stored_calibrations,
)
from .learned import DCCompensation, FitResult, LearnedSolver, fit_dc, fit_learned, fit_ls, fit_grad  # noqa: F401
from .reference import ReferenceTrajectory, reference_trajectory
from .search import Schedule, run_schedule, search_schedule

__all__ = [
    "ReferenceTrajectory", "reference_trajectory", "boss_cost_table", "bellman_path", "boss_grid",
    "run_schedule", "Schedule", "search_schedule", "Calibration", "model_fingerprint",
    "calibration_path", "save_calibration", "load_calibration", "calibrate", "calibrated_grid",
    "calibrated_schedule", "CALIBRATION_DIR",
    "CALIBRATION_KINDS", "CalibrationKind", "CalibrationRequest", "calibration_kinds", "register_calibration_kind",
    "CalibrationMismatch", "stored_calibrations", "fit_learned", "LearnedSolver",
]
