"""The solver protocol: every registered solver is a coroutine run by one driver.

Asserted: the traced requests of every fixed-step solver number exactly ``spec.nfe(steps)`` and
equal the calls counted by ``sample``; the step-at-a-time driver (``Stepper``, what the diffusers
scheduler uses) gives bit-for-bit what ``drive`` gives; ``State`` reports come once per grid
time; the example of docs/architecture.md works as written (second order, two requests a step);
no solver function is longer than 60 lines.
"""
import ast
import re
from pathlib import Path

import pytest
import torch

import straightflow as sf
from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import Eval, State, Stepper, available, drive, get_solver
from straightflow.solvers.base import CountedVelocity, SolverSpec
from straightflow.paths import get_path

ROOT = Path(__file__).resolve().parents[2]
FIELD = GaussianMixtureFlow.eight_gaussians()


def _options(spec, seed=0):
    opts = {}
    if spec.needs_path:
        opts["path"] = get_path("linear")
    if spec.stochastic:
        opts["generator"] = torch.Generator().manual_seed(seed)
    return opts


FIXED = [n for n in available() if not get_solver(n).adaptive]


@pytest.mark.parametrize("name", FIXED)
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_traced_requests_are_the_exact_cost_and_the_counted_calls(name, steps):
    spec = get_solver(name)
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    run = spec.trace(torch.zeros(1, dtype=torch.float64), ts, **_options(spec))
    assert run.nfe == spec.nfe(steps)
    assert [s.i for s in run.states] == list(range(1, steps + 1))  # one report per grid time after the start
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    assert sf.sample(FIELD, noise, solver=name, steps=steps, seed=2).nfe == run.nfe


@pytest.mark.parametrize("name", FIXED + ["dopri5"])
def test_stepper_equals_drive_bit_for_bit(name):
    spec = get_solver(name)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    ts = torch.linspace(0, 1, 5, dtype=torch.float64).tolist()
    f = CountedVelocity(FIELD)
    want = drive(spec.start(x, ts, **_options(spec)), f)
    s = Stepper(spec.start(x, ts, **_options(spec)))
    while not s.done:
        s.send(f(*s.request))
    assert torch.equal(s.result, want) and s.evaluations == f.nfe // 2
    with pytest.raises(RuntimeError, match="finished"):
        s.send(torch.zeros_like(x))


def test_a_solver_that_yields_something_else_is_refused():
    def bad(x, ts):
        yield x
        return x

    with pytest.raises(TypeError, match="Eval or State"):
        drive(bad(torch.zeros(1), [0.0, 1.0]), lambda x, t, i: x)


def test_closing_a_stepper_runs_the_solvers_cleanup():
    seen = []

    def solver(x, ts):
        try:
            v = yield Eval(x, ts[0], 0)
            return x + v
        finally:
            seen.append("closed")

    s = Stepper(solver(torch.zeros(1), [0.0, 1.0]))
    s.close()
    assert seen == ["closed"] and s.done


def _docs_example():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "yield Eval" in b)
    code = "\n".join(line for line in textwrap_dedent(block).splitlines() if not line.startswith("@register_solver"))
    ns = {}
    exec(code, ns)  # noqa: S102 - the project's own documentation
    return next(v for k, v in ns.items() if callable(v) and k not in ("Eval", "State", "register_solver"))


def textwrap_dedent(s):
    import textwrap

    return textwrap.dedent(s)


def test_the_documented_example_solver_is_second_order_with_two_requests_a_step():
    fn = _docs_example()
    spec = SolverSpec("example", fn, order=2, evals_per_step=2)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = sf.sample(FIELD, x, solver="dopri5", steps=1, rtol=1e-10, atol=1e-10).x
    errs = []
    for n in (16, 32):
        ts = torch.linspace(0, 1, n + 1, dtype=torch.float64).tolist()
        f = CountedVelocity(FIELD)
        out = spec.run(f, x, ts)
        assert f.calls == 2 * n
        errs.append(float((out - ref).pow(2).mean().sqrt()))
    assert 1.6 < torch.log2(torch.tensor(errs[0] / errs[1])).item() < 2.6


def test_no_solver_function_is_longer_than_60_lines():
    long = []
    for p in sorted((ROOT / "src" / "straightflow" / "solvers").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_state_reports_build_the_trajectory():
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    res = sf.sample(FIELD, x, solver="unipc", steps=4, return_trajectory=True)
    assert res.trajectory.shape == (5, 8, 2) and torch.equal(res.trajectory[-1], res.x)
    assert isinstance(State(1, 0.5, x), tuple) and Eval(x, 0.5).i == -1
