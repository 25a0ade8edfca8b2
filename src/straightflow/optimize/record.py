"""Calibrations: the stored record, the registry of calibration kinds, the files beside a model.

A :class:`Calibration` is an optimised schedule (time grid + one solver per step + scores) for
one request ``(kind, solver, nfe)``. It is stored as JSON at
``run_dir/calibrations/<kind>-<solver>-nfe<k>.json`` (:func:`calibration_path`; solver names
canonicalised, a solver list ``+``-joined) together with a fingerprint of the weights,
``sha256`` over the sorted ``(name, dtype, shape, bytes)`` of the state dict
(:func:`model_fingerprint`), and reused only while the weights are unchanged.

Kinds. ``CALIBRATION_KINDS`` registers how each kind is computed: a function
``fn(request: CalibrationRequest) -> Calibration`` (see :func:`register_calibration_kind`);
:func:`straightflow.optimize.calibrate` dispatches through it and
:func:`calibration_kinds` lists the names. The built-in kinds, ``boss`` and ``search``, are
registered by :mod:`.compute`, which the package always imports.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..checkpoint import unwrap
from ..grids import validate_grid
from ..io import CheckpointError, load_json, load_tensors, save_json
from ..paths import PathLike as PathSpec
from ..registry import Registry
from ..solvers import SampleResult
from ..solvers.base import SOLVERS
from ..solvers.guidance import ClassifierFreeGuidance
from ..solvers.learned import LearnedSolver, sample_learned
from .base import NoiseLike
from .reference import ReferenceTrajectory
from .search import run_schedule

CALIBRATION_DIR = "calibrations"
MODEL_FILE = "model.safetensors"
_FORMAT_VERSION = 1


class CalibrationMismatch(ValueError):
    """A calibration used with a model, shape or guidance scale it was not computed for."""


@dataclass
class Calibration:
    """A calibrated solver: what it is valid for, how it samples, and its scores.

    Two forms. A *schedule* (kinds ``boss`` and ``search``): ``times`` has ``len(solvers) + 1``
    entries, a time grid with one registered solver per step. A *table* (kinds ``learned`` and
    ``dc``): ``table`` is a :class:`~straightflow.solvers.learned.LearnedSolver` record (its
    evaluation times and coefficients), ``times`` its evaluation times and ``solvers`` empty.

    ``nfe`` is the evaluations it really makes per sample (counted when it was computed); ``budget``
    the NFE it was asked for, which names its file (a BOSS grid for midpoint at budget 5 makes 4).

    Validity: ``fingerprint`` (the weights, :func:`model_fingerprint`; ``""`` for a velocity
    function that has none), ``nfe``, ``guidance`` (the classifier-free guidance scale it was fitted
    at, None: unguided), ``shape`` (the sample shape, without the batch) and ``path``.
    :meth:`sample` refuses anything else with :class:`CalibrationMismatch`.
    ``straightflow.sample(model, noise, solver=cal)`` calls :meth:`sample`.
    """

    kind: str
    solver: str
    nfe: int
    times: List[float]
    solvers: List[str]
    grid: str = ""
    calib_rmse: Optional[float] = None
    holdout_rmse: Optional[float] = None
    reference: Dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    created: str = ""
    info: Dict[str, Any] = field(default_factory=dict)
    table: Optional[Dict[str, Any]] = None
    shape: Optional[List[int]] = None
    guidance: Optional[float] = None
    path: Any = "linear"
    version: int = _FORMAT_VERSION
    budget: Optional[int] = None

    @property
    def budget_nfe(self) -> int:
        """The NFE budget it was computed for (files written before ``budget`` was recorded: ``nfe``)."""
        return int(self.nfe if self.budget is None else self.budget)

    @property
    def grid_tensor(self) -> Tensor:
        if self.table is not None:
            raise ValueError(f"a {self.kind!r} calibration is a coefficient table, not a time grid")
        return validate_grid(torch.tensor(self.times, dtype=torch.float64), direction=1)

    @property
    def steps(self) -> int:
        return len(self.times) if self.table is not None else len(self.solvers)

    @property
    def learned_solver(self) -> LearnedSolver:
        """The coefficient table (kinds ``learned`` and ``dc``)."""
        if self.table is None:
            raise ValueError(f"a {self.kind!r} calibration has no coefficient table")
        return LearnedSolver.from_dict(self.table)

    def describe(self) -> str:
        """One line: what it is and what it is valid for."""
        g = "" if self.guidance is None else f", guidance {self.guidance:g}"
        shape = "any shape" if self.shape is None else "shape " + "x".join(str(s) for s in self.shape)
        b = "" if self.budget_nfe == int(self.nfe) else f" (budget {self.budget_nfe})"
        return f"{self.kind} calibration of {self.solver} at NFE {self.nfe}{b} ({shape}{g})"

    def check(self, model: Any = None, noise: Optional[Tensor] = None, guidance: Optional[float] = None) -> None:
        """Raise :class:`CalibrationMismatch` unless ``model`` / ``noise`` / ``guidance`` are what
        this calibration was computed for (``None`` skips that check)."""
        if noise is not None and self.shape is not None and list(noise.shape[1:]) != list(self.shape):
            raise CalibrationMismatch(f"{self.describe()} was computed for samples of shape {tuple(self.shape)}, "
                                      f"got noise of shape {tuple(noise.shape[1:])}: calibrate for this shape")
        if guidance is not None and (self.guidance is None or float(guidance) != float(self.guidance)):
            raise CalibrationMismatch(f"{self.describe()} was computed at guidance {self.guidance}, "
                                      f"got guidance {guidance}: calibrate at that scale")
        if model is not None and self.fingerprint:
            fp = model_fingerprint(model, strict=False)
            if fp and fp != self.fingerprint:
                raise CalibrationMismatch(
                    f"{self.describe()} was computed for other weights (fingerprint {self.fingerprint[:19]}..., "
                    f"this model {fp[:19]}...); calibrate again for these weights")

    def sample(self, model: Callable, noise: Tensor, cond: Optional[Dict[str, Any]] = None,
               guidance: Optional[float] = None, check_finite: bool = True, verify: bool = True) -> SampleResult:
        """Sample from ``noise`` (t = 0) with this calibration; ``res.nfe`` is counted. The guidance
        scale is the calibration's (another one is refused). ``verify=False`` skips the weights
        check (hashing the weights costs a pass over them)."""
        self.check(model if verify else None, noise, guidance)
        if self.table is not None:
            return sample_learned(model, noise, self.learned_solver, cond=cond, check_finite=check_finite)
        velocity = model if self.guidance is None else ClassifierFreeGuidance(model, float(self.guidance))
        return run_schedule(velocity, noise, self.grid_tensor, self.solvers, cond=cond, path=self.path,
                            check_finite=check_finite)

    def run(self, model, x, cond=None, **kw) -> SampleResult:
        """Sample with this calibration (same as :meth:`sample`)."""
        return self.sample(model, x, cond=cond, **kw)

    def to_dict(self) -> Dict[str, Any]:
        """The record as JSON data, with ``checksum`` over what sampling uses (see :meth:`from_dict`)."""
        d = asdict(self)
        d["checksum"] = _checksum(d)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        if not isinstance(d, Mapping):
            raise ValueError(f"a calibration must be a JSON object, got {type(d).__name__}")
        names = set(cls.__dataclass_fields__)
        missing = {"kind", "solver", "nfe", "times", "solvers"} - set(d)
        if missing:
            raise ValueError(f"calibration lacks {sorted(missing)}")
        if "checksum" in d and d["checksum"] != _checksum(d):
            raise ValueError("its checksum does not match its contents: it was edited after it was computed "
                             "(calibrate again, or delete the file)")
        cal = cls(**{k: v for k, v in d.items() if k in names})
        if cal.table is not None:
            ls = cal.learned_solver  # validates the table
            big = max(abs(v) for v in ls.a + [c for r in ls.b for c in r])
            if big > MAX_COEFFICIENT:
                raise ValueError(f"a coefficient of its table is {big:.3g}, outside the sane range "
                                 f"(|c| <= {MAX_COEFFICIENT:g}): a corrupted or hand-edited file")
            if ls.nfe != int(cal.nfe):
                raise ValueError(f"calibration table has {ls.nfe} evaluations, its record says NFE {cal.nfe}")
            return cal
        if len(cal.times) != len(cal.solvers) + 1:
            raise ValueError(f"calibration has {len(cal.times)} times for {len(cal.solvers)} steps")
        cal.grid_tensor  # validates
        return cal


MAX_COEFFICIENT = 1e3
"""Largest coefficient magnitude a stored table may have (classical and fitted tables stay below ~10)."""


def _checksum(d: Mapping[str, Any]) -> str:
    """SHA-256 of what sampling reads (kind, NFE, times, solvers, table, guidance, path), in canonical JSON."""
    keep = {k: d.get(k) for k in ("kind", "nfe", "times", "solvers", "table", "guidance", "path")}
    return "sha256:" + hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


# ====================================================================== kinds
@dataclass
class CalibrationRequest:
    """What :func:`~straightflow.optimize.calibrate` hands a calibration kind.

    ``x`` is the calibration batch (noise at t = 0) and ``reference`` its RK4 reference
    trajectory (``fine_steps`` steps; None for a kind registered with ``own_reference=True``,
    which computes its own); ``model`` is the model as given and :attr:`velocity` the field to
    integrate (``model`` under classifier-free guidance at scale ``guidance``); ``solver`` is the canonical solver label (for a kind
    registered with ``solver_list=True``, the ``+``-joined candidate list); ``holdout`` /
    ``holdout_cond`` are the held-out batch (tensor or shape; ``None``: like ``x``, drawn with
    ``seed + 1``) and its conditioning; ``options`` are the extra keyword arguments of
    ``calibrate``. ``budget_s``: when not None the batches are not pinned and a kind that can
    (``learned``, ``dc``) sizes them itself within that many CPU seconds (only ``x``'s sample
    shape matters then; conditioning from :meth:`cond_for`); ``progress``: show a progress bar.
    """

    model: Callable
    x: Tensor
    reference: Optional[ReferenceTrajectory]
    solver: str
    nfe: int
    cond: Optional[Dict[str, Any]] = None
    holdout: Optional[NoiseLike] = None
    holdout_cond: Optional[Dict[str, Any]] = None
    fine_steps: int = 256
    path: PathSpec = "linear"
    seed: int = 0
    guidance: Optional[float] = None
    options: Dict[str, Any] = field(default_factory=dict)
    budget_s: Optional[float] = None
    progress: bool = False
    cond_sampler: Optional[Callable[[int], Optional[Dict[str, Any]]]] = None

    def cond_for(self, n: int) -> Optional[Dict[str, Any]]:
        """Conditioning for a self-sized batch of ``n`` samples (``cond_sampler(n)``; None when unconditional)."""
        if self.cond_sampler is not None:
            return self.cond_sampler(int(n))
        if self.cond is not None:
            raise ValueError("a self-sized calibration needs the conditioning as a function of the batch size "
                             "(cond=lambda n: {...}), or pinned noise batches")
        return None

    @property
    def velocity(self) -> Callable:
        return self.model if self.guidance is None else ClassifierFreeGuidance(self.model, float(self.guidance))


@dataclass(frozen=True)
class CalibrationKind:
    """A registered calibration kind: its name, its function, whether ``solver`` is a list, whether
    it computes its own reference, and one line for ``straightflow list``."""

    name: str
    fn: Callable[[CalibrationRequest], Calibration]
    solver_list: bool = False
    own_reference: bool = False
    summary: str = ""


CALIBRATION_KINDS: Registry[CalibrationKind] = Registry("calibration kind")


def register_calibration_kind(
    name: str, solver_list: bool = False, own_reference: bool = False, summary: str = ""
) -> Callable[[Callable[[CalibrationRequest], Calibration]], Callable[[CalibrationRequest], Calibration]]:
    """Register ``fn(request) -> Calibration`` as calibration kind ``name`` (a decorator).

    The function computes the calibration for ``request`` (a :class:`CalibrationRequest`) and
    returns it with ``kind``, ``solver``, ``times``, ``solvers`` and its scores filled in; in
    ``Calibration.reference`` it may put kind-specific settings (e.g. the held-out batch size),
    which :func:`~straightflow.optimize.calibrate` appends to the common ones (reference solver,
    steps, batch, seed, path) before it sets the fingerprint, the date and the requested ``nfe``
    and saves the file. ``solver_list=True``: the kind takes a list of solvers (a sequence or a
    ``+``-joined string), named ``a+b+c`` in the file name. ``own_reference=True``: the kind
    computes its own reference (``request.reference`` is None).
    """

    def deco(fn: Callable[[CalibrationRequest], Calibration]) -> Callable[[CalibrationRequest], Calibration]:
        doc = (fn.__doc__ or "").strip()
        text = summary or (doc.splitlines()[0] if doc else "")
        CALIBRATION_KINDS.register(name)(CalibrationKind(name.lower(), fn, solver_list, own_reference, text))
        return fn

    return deco


def calibration_kinds() -> List[str]:
    """Names accepted as ``kind`` by :func:`~straightflow.optimize.calibrate`."""
    return CALIBRATION_KINDS.names()


# ====================================================================== files beside the model
def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


def _takes_solver_list(kind: str) -> bool:
    """True for a kind registered with ``solver_list=True`` (exact name, as the file name uses it)."""
    return kind in CALIBRATION_KINDS.names() and CALIBRATION_KINDS.get(kind).solver_list


def _canon_solver(kind: str, solver: Union[str, Sequence[str]]) -> str:
    if isinstance(solver, str):
        parts = solver.split("+") if _takes_solver_list(kind) else [solver]
    else:
        parts = list(solver)
    return "+".join(SOLVERS.canonical(p) if p in SOLVERS else p for p in parts)


def calibration_path(run_dir: Union[str, os.PathLike], kind: str, solver: Union[str, Sequence[str]], nfe: int,
                     guidance: Optional[float] = None) -> Path:
    """``run_dir/calibrations/<kind>-<solver>-nfe<k>[-cfg<w>].json`` (solver names canonicalised;
    the suffix for a calibration at classifier-free guidance scale ``w``)."""
    g = "" if guidance is None else f"-cfg{float(guidance):g}"
    return Path(run_dir) / CALIBRATION_DIR / f"{_sanitize(kind)}-{_sanitize(_canon_solver(kind, solver))}-nfe{int(nfe)}{_sanitize(g)}.json"


def _hash_state(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def model_fingerprint(model_or_run_dir: Any, strict: bool = True) -> str:
    """Identify a model's weights: SHA-256 over the sorted (name, dtype, shape, bytes) of its
    state dict. A run directory is fingerprinted from its ``model.safetensors`` the same way, so a
    model loaded from the run and the run directory itself agree. Objects with a
    ``fingerprint()`` method use it; the Gaussian-mixture oracle hashes its parameters and path.
    Anything else raises ``TypeError``, or gives ``""`` with ``strict=False``."""
    if isinstance(model_or_run_dir, (str, os.PathLike)):
        return _hash_state(load_tensors(Path(model_or_run_dir) / MODEL_FILE))
    m = model_or_run_dir
    fp = getattr(m, "fingerprint", None)
    if callable(fp):
        return str(fp())
    if hasattr(m, "state_dict") and callable(m.state_dict):
        inner = unwrap(m) if isinstance(m, torch.nn.Module) else m
        return _hash_state(inner.state_dict())
    if all(hasattr(m, a) for a in ("means", "covs", "weights", "path")):  # GaussianMixtureFlow
        state = {"means": m.means, "covs": m.covs, "weights": m.weights}
        cfg = m.path.config() if hasattr(m.path, "config") else repr(m.path)
        return _hash_state(state) + "|path=" + hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]
    if not strict:  # a plain velocity function: nothing to identify it by
        return ""
    raise TypeError(f"cannot fingerprint a {type(m).__name__}: give an nn.Module, a run directory, "
                    "or an object with a fingerprint() method")


def save_calibration(run_dir: Union[str, os.PathLike], cal: Calibration) -> Path:
    """Write ``cal`` to :func:`calibration_path` atomically; returns the path."""
    p = calibration_path(run_dir, cal.kind, cal.solver, cal.budget_nfe, cal.guidance)
    save_json(p, cal.to_dict())
    return p


def load_calibration(
    run_dir: Union[str, os.PathLike], kind: str, solver: Union[str, Sequence[str]], nfe: int,
    fingerprint: Optional[str] = None, model: Any = None, guidance: Optional[float] = None,
) -> Optional[Calibration]:
    """The stored calibration, or None when there is none, it is unreadable, or its fingerprint
    does not match the weights: ``fingerprint`` if given, else ``model``'s, else the run's
    ``model.safetensors`` (None when none of these exists: an unverifiable file is not reused)."""
    p = calibration_path(run_dir, kind, solver, nfe, guidance)
    if not p.is_file():
        return None
    try:
        cal = Calibration.from_dict(load_json(p))
    except (CheckpointError, ValueError, TypeError) as e:
        warnings.warn(f"ignoring unreadable calibration {p}: {e}")
        return None
    if fingerprint is None:
        if model is not None:
            fingerprint = model_fingerprint(model)
        elif (Path(run_dir) / MODEL_FILE).is_file():
            fingerprint = model_fingerprint(run_dir)
        else:
            return None
    return cal if cal.fingerprint == fingerprint else None


def stored_calibrations(run_dir: Union[str, os.PathLike]) -> List[Calibration]:
    """Every readable calibration file in ``run_dir/calibrations`` (not checked against the weights;
    :meth:`Calibration.check` does that), sorted by kind, NFE and solver."""
    out = []
    for p in sorted((Path(run_dir) / CALIBRATION_DIR).glob("*.json")):
        try:
            out.append(Calibration.from_dict(load_json(p)))
        except (CheckpointError, ValueError, TypeError) as e:
            warnings.warn(f"ignoring unreadable calibration {p}: {e}")
    return sorted(out, key=lambda c: (c.kind, c.nfe, c.solver))
