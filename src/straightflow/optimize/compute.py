"""Computing calibrations, or reusing stored ones: :func:`calibrate` and the built-in kinds.

:func:`calibrate` returns the calibration for ``(kind, solver, nfe)`` stored beside the model
when its weights fingerprint still matches (no model evaluation at all); otherwise it draws the
calibration batch, computes the RK4 reference trajectory on it, hands both to the kind's
registered function (:data:`~.record.CALIBRATION_KINDS`), and saves the result.

Built-in kinds (registered here):

- ``boss``: the BOSS grid for one solver (:func:`~.boss.boss_grid`), scored by the endpoint
  RMSE ``sqrt(mean((x - x_ref(1))^2))`` on the calibration batch and on a held-out batch;
- ``search``: the searched per-step schedule over a list of candidate solvers
  (:func:`~.search.search_schedule`).

Adding a kind is registering one function: ``@register_calibration_kind("name")`` on
``fn(request: CalibrationRequest) -> Calibration``.
"""
from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..checkpoint import load as load_run
from ..paths import PathLike as PathSpec
from ..paths import get_path
from ..solvers.guidance import ClassifierFreeGuidance
from .base import NoiseLike, _check_deterministic, _noise, _rmse
from .boss import boss_grid
from .record import (
    CALIBRATION_KINDS,
    Calibration,
    CalibrationRequest,
    _canon_solver,
    load_calibration,
    model_fingerprint,
    register_calibration_kind,
    save_calibration,
)
from .reference import _reference_end, reference_trajectory
from .search import run_schedule, search_schedule


# ====================================================================== built-in kinds
@register_calibration_kind("boss")
def _calibrate_boss(req: CalibrationRequest) -> Calibration:
    """BOSS time grid for one solver (Nguyen et al. 2023), scored on the calibration and held-out batch."""
    model, x, ref, cond, path, seed = req.velocity, req.x, req.reference, req.cond, req.path, req.seed
    holdout, holdout_cond = req.holdout, req.holdout_cond
    spec = _check_deterministic(req.solver)
    grid, info = boss_grid(model, x, req.nfe, spec.name, cond=cond, path=path, reference=ref,
                           return_info=True, **req.options)
    steps = grid.numel() - 1
    r = run_schedule(model, x, grid, spec.name, cond=cond, path=path)
    xh = _noise(holdout, seed + 1) if holdout is not None else _noise(tuple(x.shape), seed + 1)
    hcond = holdout_cond if holdout_cond is not None else (cond if holdout is None else None)
    href, hcalls = _reference_end(model, xh, req.fine_steps, hcond)
    rh = run_schedule(model, xh, grid, spec.name, cond=hcond, path=path)
    settings = dict(holdout_batch=int(xh.shape[0]), calibration_nfe=info["calibration_nfe"] + r.nfe,
                    holdout_nfe=hcalls + rh.nfe, candidates=info["candidates"])
    return Calibration(kind="boss", solver=spec.name, nfe=r.nfe, times=grid.tolist(), solvers=[spec.name] * steps,
                       grid="boss", calib_rmse=_rmse(r.x, ref.end), holdout_rmse=_rmse(rh.x, href),
                       reference=settings, info={"local_cost": info["local_cost"], "true_nfe": r.nfe})


@register_calibration_kind("search", solver_list=True)
def _calibrate_search(req: CalibrationRequest) -> Calibration:
    """Searched schedule: time grid and one solver per step over the +-joined candidates (S^3-style)."""
    x, holdout, seed, options = req.x, req.holdout, req.seed, req.options
    label = req.solver
    cands = label.split("+")
    sch = search_schedule(req.velocity, x, req.nfe, candidates=cands, holdout=holdout, cond=req.cond,
                          holdout_cond=req.holdout_cond, path=req.path,
                          seed=seed, reference=req.reference, **options)
    settings = dict(calibration_nfe=sch.calibration_nfe, holdout_batch=(
        int(x.shape[0]) if holdout is None else int(_noise(holdout, seed + 1).shape[0])))
    return Calibration(kind="search", solver=label, nfe=sch.nfe, times=sch.times.tolist(), solvers=sch.solvers,
                       grid=sch.grid, calib_rmse=sch.calib_rmse, holdout_rmse=sch.holdout_rmse,
                       reference=settings,
                       info={"best_single": sch.best_single, "true_nfe": sch.nfe,
                             "candidates_scored": sch.candidates_scored,
                             **{k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
                                if isinstance(v, (int, float, str, tuple, list))}})


# ====================================================================== calibrate
DEFAULT_BUDGET_S = 60.0
"""CPU seconds a self-sized calibration (``learned``, ``dc``) may take by default."""


def _default_shape(model, batch: int) -> Tuple[int, ...]:
    shape = getattr(model, "sample_shape", None)
    if shape is None and hasattr(model, "dim") and isinstance(getattr(model, "dim"), int):
        shape = (model.dim,)
    if shape is None:
        raise ValueError("give noise_or_shape (the model has no sample_shape)")
    return (batch, *tuple(shape))


@torch.no_grad()
def calibrate(
    run_dir_or_model: Any,
    kind: str,
    solver: Union[str, Sequence[str]],
    nfe: int,
    noise_or_shape: Optional[NoiseLike] = None,
    *,
    run_dir: Optional[Union[str, os.PathLike]] = None,
    cond: Optional[Dict[str, Any]] = None,
    guidance: Optional[float] = None,
    holdout: Optional[NoiseLike] = None,
    holdout_cond: Optional[Dict[str, Any]] = None,
    fine_steps: int = 256,
    path: PathSpec = "linear",
    seed: int = 0,
    batch: int = 256,
    recompute: bool = False,
    save: bool = True,
    budget_s: Optional[float] = None,
    progress: bool = False,
    **options,
) -> Calibration:
    """A solver calibrated to this model at ``nfe`` evaluations: reused from beside the model, or
    computed (and saved there).

    ``run_dir_or_model`` is a run directory (the model is loaded from it only if a computation is
    needed) or any velocity model ``model(x, t, **cond)``, as :func:`straightflow.sample` takes it
    (then ``run_dir=`` says where to store it; without it nothing is stored). ``kind`` is one of
    :func:`calibration_kinds`: ``"learned"`` (a non-stationary multistep table fitted to an
    accurate reference, ``solver`` its starting solver or ``"auto"``), ``"dc"`` (DC-Solver
    compensation of ``solver``), ``"boss"`` (:func:`boss_grid` for ``solver``), ``"search"``
    (:func:`search_schedule` over ``solver``, a sequence or a ``+``-joined string; ``grids=`` etc.
    in ``options``).

    Batches. ``learned`` and ``dc`` size their own batches by default: given a sample shape (or
    nothing: ``model.sample_shape`` / ``model.dim``), they grow the calibration and held-out batches
    until the held-out RMSE is known to +-10 % or the CPU budget ``budget_s`` (default
    :data:`DEFAULT_BUDGET_S`) is spent (cheap models get thousands of samples, a UNet what the
    budget allows; ``info["sizing"]`` records it). ``progress=True`` shows a bar with the time
    left. Pin the batches instead by giving ``noise_or_shape`` (and ``holdout``) as tensors; the
    other kinds always use ``noise_or_shape`` (a shape is drawn with ``seed``, batch ``batch``) and
    ``holdout`` (default: drawn like it with ``seed + 1``). ``cond`` / ``guidance``: conditioning
    and classifier-free guidance scale the calibration is fitted with (and only valid for);
    ``cond`` may be a function ``cond(n) -> dict`` of the batch size (needed for a self-sized
    calibration of a conditional model).

    Every ``learned`` / ``dc`` calibration reports its held-out RMSE with a prediction interval for
    a fresh batch of the same size and the 99th percentile of the per-sample error
    (``info["holdout_stats"]``, :mod:`straightflow.optimize.errors`); the fitted table replaces its
    start only when it is better on held-out noise with bootstrap probability >= 0.9.

    Options of ``learned`` / ``dc``: ``mode`` (learned: ``"auto"``, ``"ls"``, ``"grad"``, ``"ls+grad"``),
    ``rtol`` (the float64 dopri5 reference, default 1e-5), ``grad_iters``, ``time_shifts``, and, to share
    one reference across several calls (e.g. NFE 3-10 on the same batches),
    ``references=(calib_ref, holdout_ref)`` from :func:`straightflow.optimize.learned.reference`
    (extended in place with the times each fit needs) and ``model64`` (the float64 model they use).

    The result samples with ``straightflow.sample(model, noise, solver=cal)`` and records what it
    is valid for (weights fingerprint, NFE, guidance, sample shape, path). A stored file is reused,
    with no model evaluation, when its fingerprint matches; a mismatch (retrained weights)
    recomputes and overwrites it (``recompute=True`` always does).
    """
    spec = CALIBRATION_KINDS.get(kind)  # an unknown kind: UnknownNameError listing the registered names
    kind = spec.name
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if guidance is not None and not math.isfinite(float(guidance)):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if isinstance(run_dir_or_model, (str, os.PathLike)):
        run_dir = Path(run_dir_or_model)
        model = None
        fp = model_fingerprint(run_dir)
    else:
        model = run_dir_or_model
        fp = model_fingerprint(model, strict=False)
        if run_dir is not None and save and not fp:
            raise ValueError("cannot store a calibration for a velocity function with no weights to fingerprint "
                             "(give an nn.Module, or an object with a fingerprint() method, or save=False)")
    label = _canon_solver(kind, solver)
    if run_dir is not None and not recompute:
        cal = load_calibration(run_dir, kind, label, nfe, fingerprint=fp, guidance=guidance)
        want_rtol = options.get("rtol")
        if cal is not None and (want_rtol is None or cal.reference.get("rtol") in (None, float(want_rtol))):
            return cal  # (a stored file computed at another reference tolerance than asked is recomputed)
    if model is None:
        model = load_run(run_dir)
    pinned = torch.is_tensor(noise_or_shape)
    cond_sampler = cond if callable(cond) else None
    if cond_sampler is not None:
        cond = None
    self_size = spec.own_reference and not pinned and (cond is None or cond_sampler is not None)
    if budget_s is not None:
        if not self_size:
            raise ValueError("budget_s sizes the batches of a 'learned' or 'dc' calibration itself: give a shape "
                             "(or nothing) instead of a noise tensor, and conditioning as cond=lambda n: {...}")
        if not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 CPU seconds, got {budget_s!r}")
    if self_size:
        budget_s = DEFAULT_BUDGET_S if budget_s is None else float(budget_s)
        shape = noise_or_shape if noise_or_shape is not None else _default_shape(model, 1)
        x = _noise((1, *tuple(int(v) for v in shape)[1:]), seed)  # only its sample shape is used
    else:
        if cond_sampler is not None:
            n = int(noise_or_shape.shape[0]) if pinned else (tuple(noise_or_shape)[0] if noise_or_shape else batch)
            cond = cond_sampler(n)
        x = _noise(noise_or_shape if noise_or_shape is not None else _default_shape(model, batch), seed)
    velocity = model if guidance is None else ClassifierFreeGuidance(model, float(guidance))
    ref = None if spec.own_reference else reference_trajectory(velocity, x, fine_steps, cond)
    settings = {"calib_batch": int(x.shape[0]), "seed": seed}
    if ref is not None:
        settings.update(solver="rk4", fine_steps=fine_steps)
    cal = spec.fn(CalibrationRequest(
        model=model, x=x, reference=ref, solver=label, nfe=nfe, cond=cond, holdout=holdout,
        holdout_cond=holdout_cond, fine_steps=fine_steps, path=path, seed=seed, guidance=guidance,
        options=options, budget_s=budget_s if self_size else None, progress=bool(progress),
        cond_sampler=cond_sampler))
    cal.reference = {**settings, **cal.reference}  # the kind's own settings after the common ones
    cal.fingerprint = fp
    cal.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cal.shape = [int(s) for s in x.shape[1:]]
    cal.guidance = None if guidance is None else float(guidance)
    cal.path = get_path(path).config()
    # nfe: what the kind counted; the file is named by the requested budget so that the same request finds it
    cal.budget = int(nfe)
    if run_dir is not None and save:
        save_calibration(run_dir, cal)
    return cal


def calibrated_grid(
    run_dir_or_model: Any, solver: str, nfe: int, noise_or_shape: Optional[NoiseLike] = None, **kw
) -> Tensor:
    """The BOSS grid for ``solver`` at ``nfe`` from ``run_dir/calibrations`` (computed and saved on
    the first call, reused after). Use it as ``sample(model, noise, solver=solver, grid=...)``."""
    return calibrate(run_dir_or_model, "boss", solver, nfe, noise_or_shape, **kw).grid_tensor


def calibrated_schedule(
    run_dir_or_model: Any, nfe: int, candidates: Sequence[str] = ("euler", "midpoint", "heun"),
    noise_or_shape: Optional[NoiseLike] = None, **kw
) -> Calibration:
    """The searched schedule for ``candidates`` at ``nfe`` (cached like :func:`calibrated_grid`);
    sample with ``cal.run(model, noise)``."""
    return calibrate(run_dir_or_model, "search", list(candidates), nfe, noise_or_shape, **kw)
