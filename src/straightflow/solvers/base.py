"""What every solver shares: the registry, the counted velocity wrapper and the result type.

A solver is a coroutine ``solver(x, ts, **options)`` (:mod:`.protocol`) that integrates
``dx/dt = v(x, t)`` along the grid ``ts`` (increasing for sampling, decreasing for inversion):
it yields :class:`~.protocol.Eval` requests and receives the velocity, yields
:class:`~.protocol.State` reports at grid times, and returns the final state.
:meth:`SolverSpec.run` drives it against ``f(x, t, i)`` (a :class:`CountedVelocity` counts
the evaluations (NFE) and checks them for NaN/Inf); ``callback(i, t, x)`` sees the reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..paths import get_path
from ..registry import Registry
from .protocol import SolverCoroutine, Trace, drive, trace


class NonFiniteError(FloatingPointError):
    """The velocity (or the state) became NaN/Inf during a solve."""


@dataclass
class SolverSpec:
    """A registered solver: its coroutine function ``fn(x, ts, **options)`` and what the benchmarks
    and the CLI need to know. :meth:`run` drives it, :meth:`start` only creates the coroutine.

    ``cost(steps, **options)`` is the exact NFE when it is not ``evals_per_step * steps`` (warm-up
    steps, a cheaper last step); ``adaptive`` solvers choose their own steps from an error
    estimate, so their NFE is known only after the solve (``SampleResult.nfe``).
    """

    name: str
    fn: Callable
    order: int
    evals_per_step: int
    stochastic: bool = False
    needs_path: bool = False
    doc: str = ""
    cost: Optional[Callable[..., int]] = None
    adaptive: bool = False
    _nfe_cache: Dict[Tuple[int, str], int] = field(default_factory=dict, repr=False, compare=False)

    def start(self, x: Tensor, ts: Sequence[float], **options) -> SolverCoroutine:
        """The solver's coroutine on state ``x`` and grid ``ts`` (nothing runs until it is driven)."""
        return self.fn(x, ts, **options)

    def run(self, f: Callable, x: Tensor, ts: Sequence[float], callback: Optional[Callable] = None,
            **options) -> Tensor:
        """Integrate along ``ts`` from ``x``, answering requests with ``f(x, t, i)``; ``callback(i, t, x)``
        sees the state at the grid times (:func:`~.protocol.drive`)."""
        return drive(self.fn(x, ts, **options), f, callback)

    def trace(self, x: Tensor, ts: Sequence[float], f: Optional[Callable] = None, **options) -> Trace:
        """Dry-run on ``x`` with ``f`` (default: a zero velocity) and record every request and report:
        evaluation times and exact NFE from the protocol (:func:`~.protocol.trace`)."""
        return trace(self.fn(x, ts, **options), f or (lambda y, t, i: torch.zeros_like(y)))

    def nfe(self, steps: int, **options) -> int:
        """Velocity evaluations for ``steps`` steps of the uniform grid on [0, 1] with these options.

        A declared ``cost`` answers directly; otherwise the count is read off the protocol, by
        tracing the solver on that grid (``path`` defaults to linear): exact also for solvers whose
        first or last step is cheaper (DPM-Solver++(2S)/(3S) are first order where log-SNR is
        infinite). Adaptive solvers: the nominal ``evals_per_step * steps`` (their true cost is known
        only after the solve, ``SampleResult.nfe``).
        """
        if self.cost is not None:
            return int(self.cost(steps, **options))
        if self.adaptive or int(steps) < 1:
            return self.evals_per_step * int(steps)
        key = (int(steps), repr(sorted(options.items())))
        hit = self._nfe_cache.get(key)
        if hit is None:
            ts = torch.linspace(0.0, 1.0, int(steps) + 1, dtype=torch.float64).tolist()
            opts = dict(options)
            if self.needs_path and "path" not in opts:
                opts["path"] = get_path("linear")
            if self.stochastic:
                opts.setdefault("generator", torch.Generator().manual_seed(0))
            hit = self._nfe_cache[key] = self.trace(torch.zeros(1, dtype=torch.float64), ts, **opts).nfe
        return hit

    def steps_for_nfe(self, nfe: int, **options) -> int:
        """Largest step count whose exact cost does not exceed ``nfe`` (at least 1)."""
        n = 1
        while self.nfe(n + 1, **options) <= nfe:
            n += 1
        return n


SOLVERS: Registry = Registry("solver")


def register_solver(name: str, order: int, evals_per_step: int, aliases: Sequence[str] = (), stochastic: bool = False,
                    needs_path: bool = False, cost: Optional[Callable[..., int]] = None,
                    adaptive: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` under ``name`` with its order and cost per step.

    ``stochastic`` solvers receive ``generator=``; ``needs_path`` solvers (those working in log-SNR
    or with data/noise predictions) receive ``path=`` (an :class:`~straightflow.paths.AffinePath`).
    ``cost`` and ``adaptive``: see :class:`SolverSpec`.
    """

    def deco(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        SOLVERS.register(name, aliases=aliases)(
            SolverSpec(name, fn, order, evals_per_step, stochastic, needs_path, doc, cost, adaptive))
        return fn

    return deco


def lincomb(terms: Sequence[Tuple[float, Tensor]]) -> Tensor:
    """``sum_k c_k x_k`` for Python-float ``c_k`` in as few full passes as possible.

    A leading coefficient of 1 costs nothing extra (``torch.add(x, y, alpha=c)``); every further
    term is one fused in-place ``add_``. Zero coefficients are skipped. The solvers build their
    updates with this instead of ``a * x + b * y + ...`` (one temporary and one pass per operator).
    """
    terms = [(float(c), x) for c, x in terms if float(c) != 0.0]
    if not terms:
        raise ValueError("lincomb needs at least one non-zero coefficient")
    (c0, x0), rest = terms[0], terms[1:]
    if c0 == 1.0 and rest:
        (c1, x1), rest = rest[0], rest[1:]
        out = torch.add(x0, x1, alpha=c1)
    else:
        out = torch.mul(x0, c0)
    for c, x in rest:
        out.add_(x, alpha=c)
    return out


class CountedVelocity:
    """``f(x, t, i)``: evaluates ``model(x, t_batch, **cond)``, counts the evaluations, checks finiteness.

    ``t`` may be a Python float, a 0-d or 1-element tensor (broadcast to the batch) or a ``(B,)``
    tensor. Counters: ``calls`` (model calls), ``nfe`` (evaluations per sample: a model that
    really computes several rows per sample, like classifier-free guidance batching conditional
    and unconditional rows, declares ``evals_per_call`` and is charged that many) and ``rows``
    (batch rows computed, ``B * evals_per_call`` summed over calls); ``reset()`` zeroes them.
    Keyword arguments of a call are conditioning added to ``cond`` for that call only.
    ``check_finite`` costs a pass over the output and one host sync per call:
    :func:`straightflow.solvers.solve` runs its loop unchecked and replays a failed solve with the
    check on, to name the step.
    """

    def __init__(self, model: Callable, cond: Optional[Dict[str, Any]] = None, check_finite: bool = True) -> None:
        self.model = model
        self.cond = dict(cond or {})
        self.check_finite = check_finite
        self.nfe = self.calls = self.rows = 0

    def reset(self) -> None:
        self.nfe = self.calls = self.rows = 0

    def __call__(self, x: Tensor, t: Union[Tensor, float], i: int = -1, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        tb = t.expand(x.shape[0]) if t.numel() == 1 else t
        v = self.model(x, tb, **({**self.cond, **cond} if cond else self.cond))
        evals = int(getattr(self.model, "evals_per_call", 1))  # read after the call: guidance may change it
        self.calls += 1
        self.nfe += evals
        self.rows += evals * int(x.shape[0])
        if v.shape != x.shape:
            raise ValueError(f"velocity model returned shape {tuple(v.shape)} for input {tuple(x.shape)}")
        # one reduction + one host sync: the sum is finite iff every entry is, barring overflow of
        # the sum itself, which the exact check below rules out before raising
        if self.check_finite and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
            raise NonFiniteError(
                f"velocity became NaN/Inf at step {i} (t = {float(t[0]):.6g}); "
                "check the model, the input noise, and the conditioning"
            )
        return v


@dataclass
class SampleResult:
    """Output of :func:`straightflow.sample` / :func:`straightflow.invert`."""

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: Optional[Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)
