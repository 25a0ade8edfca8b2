"""Stream Batch image-to-image denoising with residual CFG and motion-aware strength.

Convention (straightflow): ``t = 0`` is noise, ``t = 1`` is data, linear path
``x_t = t x + (1 - t) eps``. A frame ``x`` is noised to ``t_start = 1 - strength`` and denoised
by ``n`` Euler steps ``x <- x + (t_{k+1} - t_k) v(x, t_k)`` on a grid from ``t_start`` to 1.

**Stream Batch** (Kodaira et al. 2023, "StreamDiffusion"): the pipeline keeps up to ``n - 1``
partly denoised frames, each at its own grid stage, plus the newest frame at stage 0; ONE model
call on this ``n``-row batch advances every slot by one Euler step and the oldest slot leaves
finished. Each frame keeps its own noise, label, strength and grid, so the output is exactly the
sequential ``n``-step denoising of every frame (``batched=False`` runs that sequential
baseline with the same code). Warm-up is explicit: the first ``n - 1`` pushes return ``None``
(their frames are still in flight, nothing half-denoised is emitted) and :meth:`flush` drains
the frames still in the buffer.

**Residual classifier-free guidance** (RCFG, same paper), adapted to velocity prediction:
``rcfg="none"`` (``n`` rows per call, conditional velocity only), ``"self"`` (self-negative,
``n`` rows), ``"initialize"`` (one-time negative, ``n + 1`` rows), ``"full"`` (CFG, ``2n`` rows).
The paper's virtual residual noise of the negative, ``eps_neg = (x_t - sqrt(a_t) x0_neg) / sqrt(b_t)``,
becomes on the linear path ``eps_neg = (x_t - t x1_neg) / (1 - t)``, where ``x1_neg`` is the
input frame itself (self-negative) or the data prediction ``x_t0 + (1 - t0) v(x_t0, t0, null)``
of ONE unconditional evaluation of the newest frame at its first stage (one-time negative).
The negative noise is scaled by ``delta`` and turned into a velocity with the same ``x_t``:
``v_neg = (x_t - delta eps_neg) / t`` (for ``delta = 1``: ``v_neg = (x1_neg - x_t) / (1 - t)``,
the velocity pointing from ``x_t`` to ``x1_neg``), then ``v = v_neg + gamma (v_cond - v_neg)``.
Because the velocity, noise and data predictions are affine in each other at a fixed ``x_t``,
guiding the velocity equals guiding the noise prediction as the paper does. Row counts match
StreamDiffusion's ``cfg_type``: "full" stacks the conditional and the null copy of every slot (``2n``),
"initialize" adds the null row of the newest frame at its first stage only (``n + 1``; the other
slots reuse their stored negative), "self" adds none (``n``). At ``guidance == 1`` every mode equals
the conditional velocity exactly, so no negative row is computed (``n`` rows, like StreamDiffusion,
which applies CFG only for ``guidance_scale > 1``).

**Motion-aware strength** (Feng et al. 2025, "StreamDiffusionV2", motion-aware noise controller):
motion ``d = clip(mean|x_k - x_{k-1}| / scale, 0, 1)`` is smoothed by an EMA
``m <- beta m + (1 - beta) d`` and mapped to ``strength = s_max - (s_max - s_min) m``: fast
motion gets less noise (conservative, avoids ghosting/tearing), static scenes more (aggressive
refinement), as in the paper. (The paper uses the RMS difference; ``metric="rms"`` selects it.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..grids import make_grid
from ..registry import Registry
from ..solvers.base import CountedVelocity

__all__ = [
    "RCFG_MODES", "RCFG", "RcfgMode", "rows_per_call", "CountingModel", "MotionStrength", "StreamOutput",
    "StreamBatchPipeline", "canonical_rcfg", "available",
]


@dataclass(frozen=True)
class RcfgMode:
    """A residual-CFG mode: one steady-state Stream Batch call computes ``row_factor * n + extra_rows`` rows."""

    name: str
    row_factor: int
    extra_rows: int
    aliases: Tuple[str, ...] = ()

    def rows(self, n: int) -> int:
        return self.row_factor * n + self.extra_rows


_MODES = (
    RcfgMode("none", 1, 0),
    RcfgMode("self", 1, 0, ("self-negative", "self_negative")),
    RcfgMode("initialize", 1, 1, ("onetime", "one-time", "onetime-negative")),
    RcfgMode("full", 2, 0, ("cfg",)),
)
RCFG: Registry = Registry("rcfg mode")
for _m in _MODES:
    RCFG.register(_m.name, aliases=_m.aliases)(_m)

RCFG_MODES: Tuple[str, ...] = tuple(m.name for m in _MODES)
"""The canonical RCFG modes (the registry :data:`RCFG` also knows their aliases)."""


def available() -> List[str]:
    """Canonical RCFG mode names, in the order of :data:`RCFG_MODES`."""
    return list(RCFG_MODES)


def canonical_rcfg(name: str) -> str:
    """The canonical RCFG mode for a name or alias; unknown names raise a ValueError listing the valid ones."""
    return RCFG.canonical(str(name))


def rows_per_call(rcfg: str, n: int) -> int:
    """Model batch rows of one steady-state Stream Batch call: none n, self n, initialize n + 1, full 2n."""
    return RCFG.get(str(rcfg)).rows(n)


class CountingModel(CountedVelocity):
    """A velocity model that counts its calls and the batch rows it computed (a
    :class:`~straightflow.solvers.base.CountedVelocity` called with per-call conditioning, without
    the finiteness check), keeps the batch size of each call in ``batch_sizes`` (the first 100000)
    and forwards other attributes (``null_class``, ``num_classes``, ``sample_shape``, ...) to the model."""

    def __init__(self, model: Callable) -> None:
        super().__init__(model, check_finite=False)
        self.batch_sizes: List[int] = []

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if len(self.batch_sizes) < 100_000:
            self.batch_sizes.append(int(x.shape[0]))
        return super().__call__(x, t, **cond)

    def reset(self) -> None:
        super().reset()
        self.batch_sizes = []

    def __getattr__(self, name: str) -> Any:
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


class MotionStrength:
    """Motion-aware img2img strength (StreamDiffusionV2): ``s = s_max - (s_max - s_min) * EMA(clip(diff / scale))``.

    ``diff`` is the mean absolute difference of consecutive frames (``metric="mad"``) or its RMS
    (``metric="rms"``, the paper's L2 measure); ``smoothing`` is the EMA weight ``beta`` of the past.
    The first frame has no motion measure and gets ``s_max``.
    """

    def __init__(self, s_min: float = 0.3, s_max: float = 0.7, scale: float = 0.25, smoothing: float = 0.5,
                 metric: str = "mad") -> None:
        if not 0.0 < s_min <= s_max < 1.0:
            raise ValueError(f"motion strength needs 0 < s_min <= s_max < 1, got s_min={s_min}, s_max={s_max}")
        if scale <= 0:
            raise ValueError(f"motion scale must be > 0, got {scale}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing (EMA weight of the past) must be in [0, 1), got {smoothing}")
        if metric not in ("mad", "rms"):
            raise ValueError(f"unknown motion metric {metric!r}; valid: mad, rms")
        self.s_min, self.s_max, self.scale, self.smoothing, self.metric = float(s_min), float(s_max), float(scale), float(smoothing), metric
        self.reset()

    def reset(self) -> None:
        self._prev: Optional[Tensor] = None
        self.motion = 0.0  # smoothed, in [0, 1]
        self.last_diff = 0.0

    def measure(self, a: Tensor, b: Tensor) -> float:
        d = (a.double() - b.double())
        return float(d.abs().mean()) if self.metric == "mad" else float(d.pow(2).mean().sqrt())

    def update(self, frame: Tensor) -> float:
        """Feed the next input frame; returns the strength for it."""
        f = frame.detach()
        if self._prev is not None and self._prev.shape == f.shape:
            self.last_diff = self.measure(f, self._prev)
            d = min(max(self.last_diff / self.scale, 0.0), 1.0)
            self.motion = self.smoothing * self.motion + (1.0 - self.smoothing) * d
        self._prev = f.clone()
        return self.strength()

    def strength(self) -> float:
        return self.s_max - (self.s_max - self.s_min) * self.motion


@dataclass
class StreamOutput:
    """One finished frame: ``x`` of shape ``(C, H, W)`` and the metadata pushed with its input."""

    x: Tensor
    frame_index: int
    strength: float
    meta: Any = None


@dataclass(eq=False)
class _Slot:
    x: Tensor                      # (1, C, H, W) current state
    times: List[float]             # n + 1 grid times, t_start .. 1
    stage: int                     # next step to take (0 .. n-1)
    y: Optional[int]
    x1_neg: Optional[Tensor]       # RCFG negative data point (self: the frame; initialize: set at stage 0)
    index: int
    strength: float
    meta: Any = None


class StreamBatchPipeline:
    """Image-to-image stream: push frames, get denoised frames back (one per call after warm-up).

    ``model(x, t, y=...)`` is a velocity model in straightflow's convention. ``n_steps`` Euler
    steps on ``grid`` from ``1 - strength`` to 1; ``batched=True`` is Stream Batch (one call of
    ``<= rows_per_call(rcfg, n)`` rows per frame), ``batched=False`` the sequential baseline
    (``n`` calls per frame, no warm-up). ``label`` is the class for a class-conditional model;
    ``guidance`` the scale ``gamma`` (fixed at construction; ``1`` computes no negative rows in any
    mode); ``delta`` the RCFG negative-noise scale. ``motion`` (a
    :class:`MotionStrength`) overrides ``strength`` per frame. Noise is drawn per frame from a
    generator seeded with ``seed``; pass ``noise=`` to :meth:`push` to supply it.
    """

    def __init__(self, model: Callable, n_steps: int = 2, strength: float = 0.5, *, rcfg: str = "none",
                 guidance: float = 1.0, delta: float = 1.0, label: Optional[int] = None, grid: str = "uniform",
                 batched: bool = True, seed: int = 0, motion: Optional[MotionStrength] = None,
                 dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None) -> None:
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
        self.model = model if isinstance(model, CountingModel) else CountingModel(model)
        self.n = n_steps
        self.rcfg = canonical_rcfg(rcfg)
        self.guidance = float(guidance)
        # guidance 1: v_neg + 1 * (v_c - v_neg) = v_c for every mode, so skip the negative rows
        self._mode = "none" if self.guidance == 1.0 else self.rcfg
        self.delta = float(delta)
        self.grid = grid
        self.batched = bool(batched)
        self.motion = motion
        self.num_classes = getattr(model, "num_classes", None)
        self.null_class = getattr(model, "null_class", None)
        if self.rcfg != "none" and self.null_class is None:
            raise ValueError(f"rcfg={self.rcfg!r} needs a class-conditional model with a null class; "
                             "use rcfg='none' for an unconditional model")
        self.label = label
        self._check_label(label)
        self.set_strength(strength)
        params = None
        try:
            params = next(iter(model.parameters()))  # type: ignore[attr-defined]
        except (AttributeError, StopIteration, TypeError):
            pass
        self.dtype = dtype or (params.dtype if params is not None else torch.float32)
        self.device = torch.device(device) if device is not None else (params.device if params is not None else torch.device("cpu"))
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._slots: List[_Slot] = []
        self.frames_in = 0
        self.frames_out = 0
        self._grid_cache: Dict[float, List[float]] = {}

    # ------------------------------------------------------------------ settings
    def _check_label(self, label: Optional[int]) -> None:
        if self.num_classes:
            if label is None:
                raise ValueError(f"this model is class-conditional: pass label= in [0, {self.num_classes})")
            if not 0 <= int(label) < int(self.num_classes):
                raise ValueError(f"label must be in [0, {self.num_classes}), got {label}")
        elif label is not None:
            raise ValueError("label= needs a class-conditional model (this one has no classes)")

    def set_label(self, label: Optional[int]) -> None:
        """Change the class for frames pushed from now on (frames in flight keep theirs)."""
        self._check_label(label)
        self.label = label

    def set_strength(self, strength: float) -> None:
        """Change the strength for frames pushed from now on (frames in flight keep their grids)."""
        s = float(strength)
        upper_open = self.rcfg in ("self", "initialize") and self.delta != 1.0
        if not (0.0 < s < 1.0 or (s == 1.0 and not upper_open)):
            raise ValueError(f"strength must be in (0, 1] ((0, 1) for rcfg self/initialize with delta != 1), got {strength}")
        self.strength = s

    @property
    def rows_per_call(self) -> int:
        """Rows of one steady-state call (``n`` for every mode at ``guidance == 1``)."""
        return rows_per_call(self._mode, self.n)

    @property
    def in_flight(self) -> int:
        return len(self._slots)

    @property
    def calls(self) -> int:
        return self.model.calls

    @property
    def rows(self) -> int:
        return self.model.rows

    def reset(self, seed: Optional[int] = None) -> None:
        """Drop the frames in flight (and reseed the noise generator when ``seed`` is given)."""
        self._slots = []
        if seed is not None:
            self.generator.manual_seed(int(seed))
        if self.motion is not None:
            self.motion.reset()

    def times_for(self, strength: float) -> List[float]:
        key = round(float(strength), 12)
        if key not in self._grid_cache:
            if len(self._grid_cache) > 4096:
                self._grid_cache.clear()
            self._grid_cache[key] = make_grid(self.grid, self.n, t0=1.0 - float(strength), t1=1.0).tolist()
        return self._grid_cache[key]

    # ------------------------------------------------------------------ streaming
    def draw_noise(self, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64).to(self.dtype).to(self.device)

    def push(self, frame: Tensor, meta: Any = None, noise: Optional[Tensor] = None) -> Optional[StreamOutput]:
        """Add one frame ``(C, H, W)``; returns the finished frame of this call or ``None`` during warm-up."""
        x = torch.as_tensor(frame).to(device=self.device, dtype=self.dtype)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"push() takes one frame of shape (C, H, W), got {tuple(frame.shape)}")
        strength = self.motion.update(x[0]) if self.motion is not None else self.strength
        times = self.times_for(strength)
        eps = self.draw_noise(x.shape) if noise is None else torch.as_tensor(noise).to(self.device, self.dtype).reshape(x.shape)
        t0 = times[0]
        slot = _Slot(x=t0 * x + (1.0 - t0) * eps, times=times, stage=0, y=self.label,
                     x1_neg=x.clone() if self._mode == "self" else None, index=self.frames_in,
                     strength=strength, meta=meta)
        self.frames_in += 1
        if not self.batched:
            finished: List[_Slot] = []
            while not finished:
                finished = self._step([slot], new=slot)
            return self._emit(finished[0])
        self._slots.append(slot)
        done = self._step(self._slots, new=slot)
        return self._emit(done[0]) if done else None

    def flush(self) -> List[StreamOutput]:
        """Finish every frame still in flight (calls of fewer rows, no new frame); oldest first."""
        out: List[StreamOutput] = []
        while self._slots:
            out += [self._emit(s) for s in self._step(self._slots, new=None)]
        return out

    def _emit(self, s: _Slot) -> StreamOutput:
        self.frames_out += 1
        return StreamOutput(x=s.x[0], frame_index=s.index, strength=s.strength, meta=s.meta)

    def _labels(self, slots: List[_Slot]) -> Optional[Tensor]:
        if not self.num_classes:
            return None
        return torch.tensor([int(s.y) for s in slots], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _step(self, slots: List[_Slot], new: Optional[_Slot]) -> List[_Slot]:
        """One model call advancing every slot by one Euler step; returns (and removes) the finished slots."""
        m = len(slots)
        x = torch.cat([s.x for s in slots]) if m > 1 else slots[0].x
        # python floats are doubles: building in self.dtype rounds them once, as float64 -> dtype would
        t = torch.tensor([s.times[s.stage] for s in slots], dtype=self.dtype, device=self.device)
        y = self._labels(slots)
        cond = {} if y is None else {"y": y}
        mode = self._mode
        if mode == "full":
            v2 = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, self.null_class)]))
            vc, vu = v2[:m], v2[m:]
            v = vu + self.guidance * (vc - vu)
        elif mode == "initialize" and new is not None and new.stage == 0:
            j = next(i for i, s in enumerate(slots) if s is new)
            xe = torch.cat([x, new.x])
            te = torch.cat([t, t[j:j + 1]])
            ye = torch.cat([y, torch.full_like(y[:1], self.null_class)])
            ve = self.model(xe, te, y=ye)
            vc = ve[:m]
            new.x1_neg = new.x + (1.0 - new.times[0]) * ve[m:]
            v = self._residual_guidance(slots, x, t, vc)
        else:
            vc = self.model(x, t, **cond)
            v = self._residual_guidance(slots, x, t, vc) if mode in ("self", "initialize") else vc
        if v.shape != x.shape:
            raise ValueError(f"velocity model returned shape {tuple(v.shape)} for input {tuple(x.shape)}")
        h = torch.tensor([s.times[s.stage + 1] - s.times[s.stage] for s in slots],
                         dtype=self.dtype, device=self.device).view(-1, *([1] * (x.ndim - 1)))
        x_next = x + h * v
        finished: List[_Slot] = []
        for i, s in enumerate(slots):
            s.x = x_next[i:i + 1]
            s.stage += 1
            if s.stage == self.n:
                finished.append(s)
        if finished and slots is self._slots:
            self._slots = [s for s in self._slots if s.stage < self.n]
        return finished

    def _residual_guidance(self, slots: List[_Slot], x: Tensor, t: Tensor, vc: Tensor) -> Tensor:
        """``v = v_neg + gamma (v_c - v_neg)`` with ``v_neg = (x_t - delta eps_neg) / t``, ``eps_neg = (x_t - t x1_neg) / (1 - t)``."""
        x1n = torch.cat([s.x1_neg for s in slots]) if len(slots) > 1 else slots[0].x1_neg
        tb = t.view(-1, *([1] * (x.ndim - 1)))
        eps_neg = (x - tb * x1n) / (1.0 - tb)
        if self.delta == 1.0:
            v_neg = x1n - eps_neg  # = (x_t - eps_neg) / t without dividing by t
        else:
            v_neg = (x - self.delta * eps_neg) / tb
        return v_neg + self.guidance * (vc - v_neg)

    # ------------------------------------------------------------------ accounting
    def counters(self) -> Dict[str, Any]:
        out = max(self.frames_out, 1)
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "calls": self.calls, "rows": self.rows,
                "calls_per_frame": self.calls / out, "rows_per_frame": self.rows / out,
                "rows_per_call_steady": self.rows_per_call if self.batched else None}
