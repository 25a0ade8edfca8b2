"""``StraightflowScheduler``: any straightflow solver, or a calibration, as a 🤗 diffusers scheduler.

This module imports diffusers (``pip install diffusers``); :mod:`straightflow.interop.diffusers`
imports it only when ``StraightflowScheduler`` is asked for. The scheduler drives the solver's
coroutine one model call per ``step()`` (:class:`~straightflow.solvers.Stepper`): the pipeline
calls the model, ``step`` sends the output in and hands back the next state the solver asks for.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor

from ..grids import GRIDS, make_grid, validate_grid
from ..paths import get_path
from ..solvers.base import SOLVERS, SolverSpec
from ..solvers.learned import ns_table
from ..solvers.protocol import Stepper
from ..time import shift_time
from .convention import Number, sigma_from_t, t_from_sigma, timestep_from_t, velocity_from_diffusers

__all__ = ["StraightflowScheduler"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- what the solver will ask for
def _solver_options(spec: SolverSpec, options: Optional[Dict[str, Any]], generator=None) -> Dict[str, Any]:
    opts = dict(options or {})
    if spec.needs_path:
        opts.setdefault("path", get_path("linear"))
    if spec.stochastic:
        opts.setdefault("generator", generator)
    return opts


def _evaluation_schedule(spec: SolverSpec, ts: List[float], options: Optional[Dict[str, Any]]) -> List[Tuple[float, int]]:
    """``[(t, step), ...]``: the time (and grid step) of every request ``spec`` makes on ``ts``, read
    off the protocol by tracing it on a one-element state (:meth:`SolverSpec.trace`). An adaptive
    solver picks its times from the state, so it cannot be a fixed-schedule diffusers scheduler;
    ``step()`` checks every later request against this schedule all the same."""
    if spec.adaptive:
        raise ValueError(f"solver {spec.name!r} chooses its evaluation times from the state (adaptive steps); "
                         "a diffusers scheduler needs a fixed schedule, use a fixed-step solver")
    gen = torch.Generator().manual_seed(0)  # stochastic solvers must not touch the global RNG
    run = spec.trace(torch.zeros(1, dtype=torch.float64), list(ts), **_solver_options(spec, options, gen))
    if not run.evals:
        raise ValueError(f"solver {spec.name!r} made no velocity evaluation on the grid {ts}")
    return [(float(e.t), int(e.i)) for e in run.evals]


def _table_spec(cal) -> Tuple[SolverSpec, List[float]]:
    """A calibrated coefficient table (``straightflow.optimize`` kinds ``learned`` / ``dc``) as a solver
    spec, and its grid: one model call per entry of ``timesteps``, on the grid of its distinct
    evaluation times (plus t = 1); it runs only from its first time to the end."""
    ls = cal.learned_solver
    name = f"calibrated {cal.kind} ({cal.info.get('initial_solver') or cal.solver}, NFE {cal.nfe})"
    uniq = sorted(set(ls.times))
    grid = uniq + ([1.0] if uniq[-1] < 1.0 else [])
    where = {t: i for i, t in enumerate(uniq)}
    index = [where[t] for t in ls.times]

    def table(x, ts, **_):
        if len(ts) != len(grid) or abs(float(ts[0]) - grid[0]) > 1e-12:
            raise ValueError(f"{name} is one non-stationary update from t = {grid[0]:.6g} to 1: "
                             "it cannot start or restart elsewhere (img2img, a changed state)")
        out, _ = yield from ns_table(x, ls.times, ls.a, ls.b, index=index)
        return out

    return SolverSpec(name, table, order=1, evals_per_step=1), grid


@dataclass
class _Solve:
    """One solve in progress: the solver's stepper, the index into ``timesteps`` of its pending
    request, the pipeline's dtype (``prev_sample`` is handed back in it) and what was handed back."""

    stepper: Stepper
    index: int
    dtype: torch.dtype
    handed: Optional[Tensor] = None

    @property
    def done(self) -> bool:
        return self.stepper.done


# ---------------------------------------------------------------------- the diffusers scheduler
class StraightflowScheduler(SchedulerMixin, ConfigMixin):
    """Run a straightflow solver inside a diffusers flow-matching pipeline (SD3, FLUX, ...).

    Args:
        num_train_timesteps: diffusers' timestep scale (``timestep = sigma * num_train_timesteps``).
        solver: any name of ``straightflow.solvers.available()`` with a fixed evaluation
            schedule: ``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"dpm++2m"``,
            ``"dpm++3m"``, ``"dpm++2s"``, ``"unipc"``, ...
        grid: a straightflow grid name (``straightflow.grids.available()``: ``"uniform"``,
            ``"logsnr"``, ``"karras"``; ``"shifted"`` means uniform + this scheduler's shift)
            used for ``set_timesteps(num_inference_steps)``. Explicit ``sigmas``/``timesteps``
            from the pipeline (the ``sigma``s at which the steps start, as FLUX passes them)
            take precedence; ``sigma = 0`` is appended as the end.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
        max_image_seq_len, time_shift_type: as in FlowMatchEulerDiscreteScheduler: the SD3
            shift ``sigma' = s sigma / (1 + (s - 1) sigma)`` is applied on top of the grid, with
            ``s = shift``, or ``s = e^mu`` (``"exponential"``) / ``s = mu`` (``"linear"``) when
            ``use_dynamic_shifting`` and the pipeline passes ``mu``. ``shift=1`` (default) is none.
        solver_options: keyword options of the solver (``{"order": 3}`` for UniPC, ...).
        grid_options: keyword options of the grid (``{"t_min": 1e-3}`` for ``"logsnr"``, ...).
            With ``grid="shifted"`` a ``shift``/``mu``/``resolution`` here is the only shift:
            combined with ``shift != 1`` or ``use_dynamic_shifting`` it is refused (it would
            shift twice).
        shift_terminal, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: as in
            FlowMatchEulerDiscreteScheduler, with its formulas, applied in its order after the
            shift to the sigmas at which the steps start (the final ``sigma = 0`` is kept):
            stretch so the last starting sigma is ``shift_terminal``; then at most one of the
            Karras (rho = 7), exponential or beta (0.6, 0.6) spacings between the first and
            the last starting sigma.
        calibration: a calibration of kind ``learned`` or ``dc`` as a dict (build the scheduler
            with :meth:`from_calibration`): the scheduler then runs that fitted table instead of
            ``solver``; it fixes its own times and NFE (``num_inference_steps`` must be its NFE
            or None; the pipeline's ``sigmas``/``mu`` are ignored, with a warning). The
            pipeline's transformer must be the calibrated model, at the calibration's guidance
            scale (a table is fitted to one velocity field; the scheduler cannot check this).
        invert_sigmas, stochastic_sampling: accepted so that ``from_config`` of a
            FlowMatchEulerDiscreteScheduler config works, but only ``False``: ``True`` raises
            (Mochi's inverted timestep convention is not supported; for stochastic sampling
            pick a stochastic straightflow solver, ``solver="sde"``).

    Explicit schedules follow FlowMatchEulerDiscreteScheduler's contract: ``sigmas`` go through
    the shift (and the options above); ``timesteps`` alone are what the model sees, so they are
    used as given, unshifted (FlowMatchEuler would still shift the step sizes derived from them,
    which a solver that evaluates the model at the times it integrates over cannot do; a
    warning says so when a shift is configured).

    How it works. A straightflow solver is a coroutine that yields the ``(x, t)`` it needs
    (:mod:`straightflow.solvers.protocol`). ``set_timesteps`` traces it on the grid to learn the
    times it will ask for (one entry of ``timesteps`` per model call, so Heun has two per step,
    as FlowMatchHeunDiscreteScheduler does). The first ``step`` creates the coroutine on the
    sample; every ``step`` sends the model output in (a :class:`~straightflow.solvers.Stepper`)
    and returns the state of the solver's next request as ``prev_sample``, or its result after
    the last request. No thread, no queue: the solver math is exactly ``straightflow.sample``'s.

    ``timesteps`` holds one entry per model call (``len(timesteps)`` is the NFE; multi-stage
    solvers have several per grid step and ``order`` is the solver's evaluations per step);
    ``sigmas`` the matching noise levels plus the final one. ``step`` returns, as
    ``prev_sample``, the state the solver wants evaluated next (the last ``step``: its result);
    the pipeline must pass it back unchanged as the next ``sample``. A pipeline that changes
    the state between steps (inpainting, callbacks) may do so only where a grid step starts:
    the solver is then restarted there from the new state (multistep history is lost).
    Stochastic solvers take ``generator=`` from the first ``step`` call.

    With the default ``grid="uniform"`` the grid is ``sigma = 1, 1 - 1/N, ..., 0``, whereas
    FlowMatchEulerDiscreteScheduler's default spacing ends at ``sigma = 1/1000``; pass the
    same ``sigmas`` to both to compare them step for step.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver: str = "euler",
        grid: str = "uniform",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        solver_options: Optional[Dict[str, Any]] = None,
        grid_options: Optional[Dict[str, Any]] = None,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        invert_sigmas: bool = False,
        stochastic_sampling: bool = False,
        calibration: Optional[Dict[str, Any]] = None,
    ):
        self._cal = None
        if calibration is not None:
            from ..optimize import Calibration

            if not isinstance(calibration, dict):
                raise TypeError("calibration must be a dict (Calibration.to_dict()); use "
                                "StraightflowScheduler.from_calibration(cal)")
            self._cal = Calibration.from_dict(calibration)
            if self._cal.table is None:
                raise ValueError(f"a {self._cal.kind!r} calibration is a grid with per-step solvers; the "
                                 "scheduler runs coefficient tables (kinds learned, dc)")
            self._spec, self._table_grid = _table_spec(self._cal)
        else:
            self._spec = SOLVERS.get(solver)  # unknown names fail here, with the list of valid ones
        GRIDS.canonical(grid)
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if invert_sigmas:
            raise ValueError("StraightflowScheduler does not support invert_sigmas=True (Mochi's inverted "
                             "timestep convention); wrap such a model so it takes sigma * num_train_timesteps")
        if stochastic_sampling:
            raise ValueError("StraightflowScheduler does not support stochastic_sampling=True (FlowMatchEuler's "
                             "renoising step); pick a stochastic straightflow solver instead, e.g. solver='sde'")
        if sum(bool(v) for v in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used")
        if shift_terminal is not None and not 0.0 <= float(shift_terminal) < 1.0:
            raise ValueError(f"shift_terminal must be in [0, 1), got {shift_terminal}")
        gshift = sorted({"shift", "mu", "resolution"} & set((grid_options or {}).keys()))
        if GRIDS.canonical(grid) == "shifted" and gshift and (shift != 1.0 or use_dynamic_shifting):
            raise ValueError(
                f"grid='shifted' with {gshift[0]!r} in grid_options and the scheduler's own "
                f"{'dynamic shifting' if use_dynamic_shifting else f'shift={shift}'} would shift the grid "
                "twice; give the shift once (the scheduler's shift, or grid_options with shift=1)")
        self.order = self._spec.evals_per_step
        self._shift = float(shift)
        self.timesteps: Optional[Tensor] = None
        self.sigmas: Optional[Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._grid: Optional[List[float]] = None
        self._evals: List[Tuple[float, int]] = []
        self._run: Optional[_Solve] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    @classmethod
    def from_calibration(cls, calibration, **kwargs) -> "StraightflowScheduler":
        """A scheduler that runs ``calibration`` (``straightflow.optimize.calibrate(...)`` of kind
        ``learned`` or ``dc``, or its dict) inside a pipeline."""
        d = calibration if isinstance(calibration, dict) else calibration.to_dict()
        return cls(calibration=d, **kwargs)

    # ------------------------------------------------------------ diffusers API
    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = float(shift)

    @property
    def step_index(self) -> Optional[int]:
        """Index into ``timesteps`` of the model output the next ``step`` expects."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img); it must be the first evaluation of a grid step."""
        self._begin_index = int(begin_index)

    @property
    def grid(self) -> Optional[List[float]]:
        """The straightflow time grid (increasing ``t``) of the last ``set_timesteps``."""
        return None if self._grid is None else list(self._grid)

    @property
    def evaluation_times(self) -> List[float]:
        """straightflow time ``t`` of each model call (``timesteps`` in straightflow units)."""
        return [t for t, _ in self._evals]

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: Tensor, timestep: Optional[Number] = None) -> Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[Sequence[float]] = None,
        mu: Optional[float] = None,
        timesteps: Optional[Sequence[float]] = None,
    ) -> None:
        """Build the grid and the evaluation schedule; ends any solve in progress."""
        cfg = self.config
        self._reset()
        if self._cal is not None:
            if num_inference_steps is not None and int(num_inference_steps) != self._cal.nfe:
                raise ValueError(f"this scheduler runs a calibration made for NFE {self._cal.nfe}; call the "
                                 f"pipeline with num_inference_steps={self._cal.nfe}")
            if sigmas is not None or timesteps is not None or mu is not None:
                logger.warning("StraightflowScheduler: the calibration fixes its own times; the pipeline's "
                               "sigmas/timesteps/mu are ignored")
            self._set_schedule(list(self._table_grid), device)
            return
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None:
            logger.warning("StraightflowScheduler: both sigmas and timesteps given; using sigmas (the "
                           "timesteps the model sees are always those of the solver's evaluations)")
        as_given = timesteps is not None and sigmas is None
        if as_given:
            sigmas = [float(s) / cfg.num_train_timesteps for s in _as_list(timesteps)]
            if cfg.use_dynamic_shifting or self._shift != 1.0 or cfg.shift_terminal is not None or _spacing(cfg):
                logger.warning("StraightflowScheduler: `timesteps` without `sigmas` are used as given, not "
                               "shifted or respaced (the model sees them as in FlowMatchEulerDiscreteScheduler); "
                               "pass `sigmas` to get the configured shift")
        if sigmas is not None:
            s = torch.tensor(_as_list(sigmas), dtype=torch.float64)
            if num_inference_steps is not None and len(s) != num_inference_steps:
                raise ValueError("`sigmas`/`timesteps` should have num_inference_steps entries")
            if s.ndim != 1 or len(s) == 0:
                raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {tuple(s.shape)}")
            if float(s[-1]) > 0.0:
                s = torch.cat([s, s.new_zeros(1)])
            g = t_from_sigma(s)
        else:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps, sigmas or timesteps")
            gopts = dict(cfg.grid_options or {})
            if GRIDS.canonical(cfg.grid) == "shifted" and not {"shift", "mu", "resolution"} & gopts.keys():
                gopts["shift"] = 1.0  # the scheduler's own shift (below) does the shifting
            g = make_grid(cfg.grid, int(num_inference_steps), **gopts)
        if cfg.use_dynamic_shifting:
            s_ = math.exp(mu) if cfg.time_shift_type == "exponential" else float(mu)
        else:
            s_ = self._shift
        if s_ <= 0:
            raise ValueError(f"the time shift must be > 0, got {s_}")
        if s_ != 1.0 and not as_given:
            g = shift_time(g, s_)
        if not as_given and (cfg.shift_terminal is not None or _spacing(cfg)):
            g = _flow_match_sigma_options(cfg, g)
        self._set_schedule(validate_grid(g, direction=+1).tolist(), device)

    def _set_schedule(self, ts: List[float], device) -> None:
        cfg = self.config
        evals = _evaluation_schedule(self._spec, ts, None if self._cal is not None else cfg.solver_options)
        t_eval = torch.tensor([t for t, _ in evals], dtype=torch.float32)
        self._grid, self._evals = ts, evals
        self.num_inference_steps = len(ts) - 1
        self.timesteps = timestep_from_t(t_eval, cfg.num_train_timesteps).to(device)
        sig = sigma_from_t(torch.tensor([t for t, _ in evals] + [ts[-1]], dtype=torch.float64))
        self.sigmas = sig.to(torch.float32).to(device)

    def index_for_timestep(self, timestep: Number, schedule_timesteps: Optional[Tensor] = None) -> int:
        """First index of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``)."""
        sched = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if sched is None:
            raise RuntimeError("call set_timesteps first")
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        d = (sched.detach().double().cpu() - value).abs()
        j = int(torch.argmin(d))
        if float(d[j]) > self._tol():
            raise ValueError(f"timestep {value:.6g} is not in this scheduler's timesteps")
        return j

    def scale_noise(self, sample: Tensor, timestep: Number, noise: Optional[Tensor] = None) -> Tensor:
        """Forward process (img2img): ``sigma noise + (1 - sigma) sample`` at ``timestep``."""
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps first")
        timestep = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timestep]
        elif self._step_index is not None:
            idx = [self._step_index] * len(timestep)
        else:
            idx = [self._begin_index] * len(timestep)
        sigma = self.sigmas.to(device=sample.device, dtype=sample.dtype)[idx].flatten()
        while sigma.ndim < sample.ndim:
            sigma = sigma.unsqueeze(-1)
        if noise is None:
            noise = torch.randn_like(sample)
        return sigma * noise + (1.0 - sigma) * sample

    def step(
        self,
        model_output: Tensor,
        timestep: Number,
        sample: Tensor,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
        **kwargs: Any,
    ):
        """Give the solver the model output at ``sample``; return the next state to evaluate
        (or, after the last evaluation, the solver's result) as ``prev_sample``."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps before step")
        run = self._run
        if run is not None and run.done:
            raise RuntimeError("all timesteps are used; call set_timesteps for a new solve")
        if run is None:
            j = self._begin_index if self._begin_index is not None else self._start_index(timestep)
        else:
            j = run.index
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        if not 0 <= j < len(self._evals) or abs(value - float(self.timesteps[j])) > self._tol():
            raise ValueError(
                f"step() got timestep {value:.6g} but the solver evaluates next at timesteps[{j}]"
                f"{'' if not 0 <= j < len(self._evals) else f' = {float(self.timesteps[j]):.6g}'}; "
                "iterate over scheduler.timesteps in order")
        if run is None:
            run = self._start(j, sample, generator)
        elif not self._same(sample, run.handed):
            run = self._restart(sample, generator)
        x_req = run.stepper.request.x
        try:
            nxt = run.stepper.send(velocity_from_diffusers(model_output.to(device=x_req.device, dtype=x_req.dtype)))
        except BaseException:
            self._reset_run()
            raise
        if nxt is not None:
            run.index += 1
            t_expected = self._evals[run.index][0] if run.index < len(self._evals) else None
            if t_expected is None or abs(float(nxt.t) - t_expected) > 1e-9:
                self._reset()
                raise RuntimeError(f"solver {self._spec.name!r} asked for t = {float(nxt.t):.6g}, not the "
                                   f"recorded t = {t_expected}; its schedule is not fixed")
            out = nxt.x.to(run.dtype)
        else:
            if run.index != len(self._evals) - 1:
                raise RuntimeError("solver finished before using all timesteps")
            run.index += 1
            out = run.stepper.result.to(run.dtype)
        run.handed = out
        self._step_index = run.index
        if not return_dict:
            return (out,)
        return SchedulerOutput(prev_sample=out)

    # ------------------------------------------------------------ internals
    def _tol(self) -> float:
        return 1e-4 * self.config.num_train_timesteps

    @staticmethod
    def _same(sample: Tensor, handed: Optional[Tensor]) -> bool:
        if handed is None or sample is handed:
            return True
        return sample.shape == handed.shape and torch.equal(sample.to(handed.dtype), handed)

    def _first_of_step(self, k: int) -> bool:
        t_k, i = self._evals[k]
        return (k == 0 or self._evals[k - 1][1] != i) and abs(t_k - self._grid[i]) < 1e-12

    def _start_index(self, timestep: Number) -> int:
        """Where a pipeline that did not call ``set_begin_index`` starts: the evaluation at
        ``timestep`` that begins a grid step (a time can repeat: Heun ends a step where the next begins)."""
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        d = (self.timesteps.detach().double().cpu() - value).abs()
        hits = [int(j) for j in torch.nonzero(d <= self._tol()).reshape(-1)]
        if not hits:
            raise ValueError(f"timestep {value:.6g} is not in this scheduler's timesteps")
        return next((j for j in hits if self._first_of_step(j)), hits[0])

    def _start(self, k: int, sample: Tensor, generator) -> _Solve:
        """Start the solver at evaluation ``k`` (the first evaluation of a grid step) from ``sample``."""
        if not 0 <= k < len(self._evals):
            raise ValueError(f"start index {k} is outside the {len(self._evals)} timesteps")
        t_k, i = self._evals[k]
        if not self._first_of_step(k):
            raise ValueError(
                f"timesteps[{k}] is inside a step of solver {self._spec.name!r} (order {self.order}); "
                "a solve can only start (or the state be changed) where a grid step starts")
        ts = self._grid[i:]
        if k > 0:
            tail = [t for t, _ in _evaluation_schedule(self._spec, ts, self.config.solver_options)]
            if tail != [t for t, _ in self._evals[k:]]:
                raise ValueError(f"solver {self._spec.name!r} evaluates at other times when started at "
                                 f"t = {ts[0]:.6g}; cannot start at timesteps[{k}]")
        if self._cal is not None:
            self._cal.check(noise=sample)  # the sample shape it was fitted for
        dtype = sample.dtype
        state_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        x = sample.to(state_dtype)
        opts = _solver_options(self._spec, self.config.solver_options, generator)
        run = _Solve(Stepper(self._spec.start(x, ts, **opts)), k, dtype)
        self._run = run
        req = run.stepper.request
        if req is None or not self._same(req.x, x) or abs(float(req.t) - t_k) > 1e-9:
            self._reset()
            raise RuntimeError(f"solver {self._spec.name!r} did not start with an evaluation at its first state")
        self._step_index = k
        return run

    def _restart(self, sample: Tensor, generator) -> _Solve:
        k = self._run.index
        self._reset_run()
        logger.info("StraightflowScheduler: the pipeline changed the state at timesteps[%d]; "
                    "restarting solver %r there", k, self._spec.name)
        return self._start(k, sample, generator)

    def _reset_run(self) -> None:
        if self._run is not None:
            self._run.stepper.close()
            self._run = None

    def _reset(self) -> None:
        self._reset_run()
        self._step_index = None
        self._begin_index = None

    def __getstate__(self):  # copy.deepcopy / pickle: the configuration and schedule, not a running solve
        state = self.__dict__.copy()
        state["_run"] = None
        state["_step_index"] = None
        return state


def _spacing(cfg) -> bool:
    return bool(cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas)


def _flow_match_sigma_options(cfg, g: Tensor) -> Tensor:
    """FlowMatchEulerDiscreteScheduler's ``shift_terminal`` and Karras/exponential/beta spacings,
    applied (with its own methods, in its order) to the starting sigmas ``1 - g[:-1]``; the end
    ``g[-1]`` is kept."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fm = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=cfg.num_train_timesteps, shift_terminal=cfg.shift_terminal,
        use_karras_sigmas=cfg.use_karras_sigmas, use_exponential_sigmas=cfg.use_exponential_sigmas,
        use_beta_sigmas=cfg.use_beta_sigmas)
    g = torch.as_tensor(g, dtype=torch.float64)
    sig = sigma_from_t(g[:-1]).numpy()
    n = len(sig)
    if cfg.shift_terminal is not None:
        sig = fm.stretch_shift_to_terminal(sig)
    if cfg.use_karras_sigmas:
        sig = fm._convert_to_karras(in_sigmas=torch.as_tensor(sig), num_inference_steps=n)
    elif cfg.use_exponential_sigmas:
        sig = fm._convert_to_exponential(in_sigmas=torch.as_tensor(sig), num_inference_steps=n)
    elif cfg.use_beta_sigmas:
        sig = fm._convert_to_beta(in_sigmas=torch.as_tensor(sig), num_inference_steps=n)
    starts = t_from_sigma(torch.as_tensor(sig, dtype=torch.float64).reshape(-1))
    return torch.cat([starts, g[-1:]])


def _as_list(values) -> List[float]:
    if torch.is_tensor(values):
        return [float(v) for v in values.detach().reshape(-1).cpu().tolist()]
    return [float(v) for v in values]
