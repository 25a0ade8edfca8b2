"""The solver protocol: a solver is a coroutine, and one driver runs every solver everywhere.

A solver is a generator function ``solver(x, ts, **options)`` (k-diffusion style: one short
function per method) that integrates ``dx/dt = v(x, t)`` along the grid ``ts`` and talks to
whoever runs it with two messages:

* ``v = yield Eval(x, t, i)``: "give me the velocity at ``(x, t)``" (``i`` is the grid step it
  belongs to, for error messages and for schedulers that group evaluations by step); the
  driver sends the velocity back as the value of the ``yield``;
* ``yield State(i, t, x)``: "the state at grid time ``ts[i]`` is ``x``" (a report: the driver
  sends ``None`` back). It builds trajectories and progress bars.

The solver ``return``\\ s the final state. Nothing else: a solver never sees the model, counts
nothing and has no callback. Sub-steps compose with ``yield from`` (``x = yield from
rk(x, t, h, RK4)``).

Adding a solver (see docs/architecture.md)::

    @register_solver("euler", order=1, evals_per_step=1)
    def euler(x, ts):
        for i in range(len(ts) - 1):
            v = yield Eval(x, ts[i], i)
            x = x + (ts[i + 1] - ts[i]) * v
            yield State(i + 1, ts[i + 1], x)
        return x

Drivers. :func:`drive` runs a solver against a velocity function ``f(x, t, i)`` to the end (what
``sample``, ``invert``, calibration and streaming use). :class:`Stepper` runs it one evaluation
at a time, for code that receives velocities from outside (the diffusers scheduler's ``step()``
sends the model output in). :func:`trace` dry-runs it with a stand-in velocity and records
every request, which is how evaluation times, NFE and (with a coefficient-vector state) the
exact linear table of a solver are read off the protocol. All three are the same loop
(:class:`Stepper`).
"""
from __future__ import annotations

from typing import Callable, Generator, List, NamedTuple, Optional, Union

from torch import Tensor

__all__ = ["Eval", "State", "SolverCoroutine", "Stepper", "drive", "trace"]


class Eval(NamedTuple):
    """A request for the velocity at ``(x, t)``; ``i`` is the grid step it belongs to."""

    x: Tensor
    t: Union[float, Tensor]
    i: int = -1


class State(NamedTuple):
    """A report: the solver's state at grid index ``i`` (time ``t``) is ``x``."""

    i: int
    t: Union[float, Tensor]
    x: Tensor


SolverCoroutine = Generator[Union[Eval, State], Optional[Tensor], Tensor]
"""What a registered solver function returns when called: yields requests and reports, returns x."""

Velocity = Callable[..., Tensor]
"""``f(x, t, i) -> v``."""


class Stepper:
    """Run a solver coroutine one evaluation at a time.

    ``request`` is the pending :class:`Eval` (``None`` once the solver has returned; the result
    is then in ``result``). ``send(v)`` hands the velocity for the pending request to the solver
    and runs it to its next request, passing every :class:`State` report on to ``on_state``
    (``on_state(i, t, x)``, the classic callback signature). Nothing runs on another thread:
    the solver advances inside ``send``.
    """

    def __init__(self, coro: SolverCoroutine, on_state: Optional[Callable[[int, float, Tensor], None]] = None) -> None:
        self._coro = coro
        self._on_state = on_state
        self.result: Optional[Tensor] = None
        self.evaluations = 0
        self.request: Optional[Eval] = self._advance(None, first=True)

    @property
    def done(self) -> bool:
        return self.request is None

    def _advance(self, value: Optional[Tensor], first: bool = False) -> Optional[Eval]:
        try:
            msg = next(self._coro) if first else self._coro.send(value)
            while not isinstance(msg, Eval):
                if not isinstance(msg, State):
                    raise TypeError(f"a solver yields Eval or State, got {type(msg).__name__}")
                if self._on_state is not None:
                    self._on_state(msg.i, msg.t, msg.x)
                msg = self._coro.send(None)
            return msg
        except StopIteration as stop:
            self.result = stop.value
            return None

    def send(self, v: Tensor) -> Optional[Eval]:
        """Answer the pending request with ``v``; return the next request (``None`` when done)."""
        if self.request is None:
            raise RuntimeError("the solver has finished; it takes no more velocities")
        self.evaluations += 1
        self.request = self._advance(v)
        return self.request

    def close(self) -> None:
        """Abandon the solve (the coroutine's ``finally`` blocks run)."""
        self._coro.close()
        self.request = None


def drive(coro: SolverCoroutine, f: Velocity, callback: Optional[Callable[[int, float, Tensor], None]] = None) -> Tensor:
    """Run ``coro`` to the end, answering every request with ``f(x, t, i)``; return the final state.

    ``callback(i, t, x)`` sees every :class:`State` report.
    """
    s = Stepper(coro, callback)
    while s.request is not None:
        x, t, i = s.request
        s.send(f(x, t, i))
    return s.result


class Trace(NamedTuple):
    """What :func:`trace` records: every request (in order), every report, and the result."""

    evals: List[Eval]
    states: List[State]
    result: Tensor

    @property
    def times(self) -> List[float]:
        return [float(e.t) for e in self.evals]

    @property
    def nfe(self) -> int:
        return len(self.evals)


def trace(coro: SolverCoroutine, f: Velocity) -> Trace:
    """Drive ``coro`` with ``f`` and record every request and report (a dry run: evaluation
    times and NFE with a stand-in velocity, or a solver's linear table with a basis-vector one)."""
    evals: List[Eval] = []
    states: List[State] = []

    def record(x, t, i):
        evals.append(Eval(x, t, i))
        return f(x, t, i)

    out = drive(coro, record, lambda i, t, x: states.append(State(i, t, x)))
    return Trace(evals, states, out)
