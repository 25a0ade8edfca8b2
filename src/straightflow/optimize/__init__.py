"""Solvers fitted to the user's own model: learned solver tables, DC-Solver, BOSS grids, searched schedules.

One entry point, :func:`calibrate`, for every *calibration kind* (:func:`calibration_kinds`)::

    cal = sf.optimize.calibrate(model, "learned", "auto", nfe=6, noise_or_shape=(512, 2))
    out = sf.sample(model, noise, solver=cal)            # NFE 6, counted as usual
    cal = sf.optimize.calibrate("runs/x", "learned", "auto", 6)   # stored in runs/x/calibrations/

Kinds:

* ``learned`` (:mod:`.learned`) -- a non-stationary multistep table ``X_j = a_j x_0 + sum_k b_jk u_k``
  with its own evaluation times (Bespoke Non-Stationary solvers, Shaul et al. 2024), started from
  the exact table of the best classical solver at that NFE, fitted to a float64 dopri5 reference on
  a calibration batch (least squares along its own trajectory without back-propagating into the
  network, and/or L-BFGS through the model), kept only if it beats its start on held-out noise.
* ``dc`` (:mod:`.learned`) -- DC-Solver dynamic compensation (Zhao et al. 2024) of a multistep solver.
* ``boss`` (:mod:`.boss`) -- Bellman Optimal Step-size Straightening (Nguyen et al. 2023): the time
  grid for a given solver that minimises the summed local error along a reference trajectory.
* ``search`` (:mod:`.search`) -- a searched (time grid, per-step solver) schedule under an exact NFE
  budget (in the spirit of S^3 / USF).

A :class:`Calibration` records what it is valid for (weights fingerprint, NFE, guidance scale,
sample shape, path) and refuses anything else (:class:`CalibrationMismatch`); stored beside a run
it is reused while the weights are unchanged (:func:`load_calibration`, :func:`stored_calibrations`).
``straightflow calibrate RUN --nfe 6`` and ``straightflow sample RUN --calibrated`` use the files;
``StraightflowScheduler.from_calibration(cal)`` runs one inside a diffusers pipeline.

Modules: :mod:`.base` (shared helpers), :mod:`.reference` (the RK4 reference trajectory of
``boss``/``search``), :mod:`.boss`, :mod:`.search`, :mod:`.learned` (tables, fits, DC-Solver),
:mod:`.record` (the record, the registry of kinds, files and fingerprints),
:mod:`.compute` (:func:`calibrate`). A new kind is one function registered with
:func:`register_calibration_kind`.

Conventions: time runs from noise (t = 0) to data (t = 1); RMSE is over all elements,
``sqrt(mean((x - x_ref(1))^2))``.
"""
from __future__ import annotations

from .base import NoiseLike  # noqa: F401
from .boss import bellman_path, boss_cost_table, boss_grid
from .compute import DEFAULT_BUDGET_S, calibrate, calibrated_grid, calibrated_schedule
from .record import (  # noqa: F401
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
from .errors import ErrorStats, error_stats, per_sample_sq_error, prob_better
from .reference import ReferenceTrajectory, reference_trajectory
from .search import Schedule, run_schedule, search_schedule

__all__ = [
    "ReferenceTrajectory", "reference_trajectory", "boss_cost_table", "bellman_path", "boss_grid",
    "run_schedule", "Schedule", "search_schedule", "Calibration", "model_fingerprint",
    "calibration_path", "save_calibration", "load_calibration", "calibrate", "calibrated_grid",
    "calibrated_schedule", "CALIBRATION_DIR",
    "CALIBRATION_KINDS", "CalibrationKind", "CalibrationRequest", "calibration_kinds", "register_calibration_kind",
    "CalibrationMismatch", "stored_calibrations", "fit_learned", "LearnedSolver", "DEFAULT_BUDGET_S",
    "ErrorStats", "error_stats", "per_sample_sq_error", "prob_better",
]
