"""The shared sampling pieces: Butcher tableaux and rk_step, costs and `adaptive` declared at
registration, the one counter (CountedVelocity), the one initial-noise helper, the log-SNR toolkit."""
import math

import pytest
import torch

import straightflow as sf
from straightflow.control import inverse
from straightflow.control.adjoint import adjoint_gradients
from straightflow.control.editing import class_swap_edit, rf_invert
from straightflow.control.operators import make_operator
from straightflow.images.fast import fast_sample
from straightflow.models import MLP
from straightflow.paths import get_path
from straightflow.registry import UnknownNameError
from straightflow.report import sample_like
from straightflow.solvers import available, get_solver, initial_noise, sample
from straightflow.solvers.base import CountedVelocity
from straightflow.solvers.guidance import ClassifierFreeGuidance
from straightflow.solvers.logsnr import alpha_sigma_lambda, hphi, x1_coefficients, x1_from_velocity
from straightflow.solvers.multistep import exact_nfe, steps_for_nfe
from straightflow.solvers.rk import EULER, HEUN, MIDPOINT, RK3, RK4, TABLEAUX, Tableau, get_tableau, rk_step

F64 = torch.float64


# ----------------------------------------------------------------------------- tableaux
def _field(x, t):
    return torch.sin(3.0 * x) * (1.0 + t) - 0.5 * x * t * t


# The explicit updates written out before the tableaux existed (ode.py, multistep.py, fast.py).
def _old_euler(f, x, t, h):
    return x + h * f(x, t)


def _old_midpoint(f, x, t, h):
    k1 = f(x, t)
    return x + h * f(x + 0.5 * h * k1, t + 0.5 * h)


def _old_heun(f, x, t, h):
    k1 = f(x, t)
    return x + 0.5 * h * (k1 + f(x + h * k1, t + h))


def _old_rk3(f, x, t, h):  # Kutta's third-order method
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + h * (2 * k2 - k1), t + h)
    return x + (h / 6) * (k1 + 4 * k2 + k3)


def _old_rk4(f, x, t, h):
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t + h)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


OLD = [(EULER, _old_euler), (MIDPOINT, _old_midpoint), (HEUN, _old_heun), (RK3, _old_rk3), (RK4, _old_rk4)]


class _Recorder:
    def __init__(self):
        self.times = []

    def __call__(self, x, t, i=-1):
        self.times.append(float(t))
        return _field(x, t)


@pytest.mark.parametrize("tab,old", OLD, ids=[t.name for t, _ in OLD])
def test_rk_step_reproduces_the_explicit_formulas_float_path(tab, old):
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for t, h in [(0.1, 0.3), (0.85, 0.15), (0.9, -0.2)]:
        new_rec, old_rec = _Recorder(), _Recorder()
        got = rk_step(new_rec, x, t, h, tab)
        want = old(lambda y, s: old_rec(y, s), x, t, h)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)  # lincomb's fused adds: rounding only
        assert new_rec.times == old_rec.times and len(new_rec.times) == tab.stages  # same stages, same times


@pytest.mark.parametrize("tab,old", OLD, ids=[t.name for t, _ in OLD])
def test_rk_step_reproduces_the_explicit_formulas_tensor_path(tab, old):
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ts = torch.tensor([0.1, 0.4, 1.0], dtype=F64)
    for i in range(2):
        t, h = ts[i], ts[i + 1] - ts[i]  # 0-d tensors, as in the sync-free image loop
        got = rk_step(lambda y, s, _i: _field(y, s), x, t, h, tab)
        want = old(_field, x, t, h)
        if tab.name in ("euler", "midpoint"):
            assert torch.equal(got, want)  # the same operations in the same order
        else:
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_rk_step_reuses_a_given_first_stage_and_tableaux_are_registered():
    x = torch.randn(8, 2, dtype=F64)
    rec = _Recorder()
    k1 = _field(x, 0.2)
    out = rk_step(rec, x, 0.2, 0.1, RK4, k1=k1)
    assert len(rec.times) == 3
    torch.testing.assert_close(out, rk_step(_Recorder(), x, 0.2, 0.1, RK4), rtol=0, atol=0)
    assert TABLEAUX.names() == ["euler", "heun", "midpoint", "rk3", "rk4"] and get_tableau("RK4") is RK4
    assert [get_tableau(n).stages for n in ("euler", "midpoint", "heun", "rk3", "rk4")] == [1, 2, 2, 3, 4]
    for tab in (EULER, MIDPOINT, HEUN, RK3, RK4):  # consistency: sum b = 1, c_j = sum_l a_jl
        assert math.isclose(sum(tab.b), 1.0) and all(math.isclose(c, sum(r)) for c, r in zip(tab.c, tab.a))
    with pytest.raises(UnknownNameError, match="euler, heun, midpoint, rk3, rk4"):
        get_tableau("dopri5")
    with pytest.raises(ValueError, match="one entry per stage"):
        Tableau("bad", 1, (0.0, 1.0), ((),), (1.0,))


def test_rk_orders_on_a_linear_ode():
    """x' = -x from 1 over [0, 1]: global error falls like h^order for every tableau."""
    f = lambda x, t, i=-1: -x  # noqa: E731
    for tab in (EULER, MIDPOINT, HEUN, RK3, RK4):
        errs = []
        for n in (16, 32):
            x = torch.ones(1, dtype=F64)
            for i in range(n):
                x = rk_step(f, x, i / n, 1.0 / n, tab)
            errs.append(abs(float(x) - math.exp(-1.0)))
        assert abs(math.log2(errs[0] / errs[1]) - tab.order) < 0.15, tab.name


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk3", "rk4"])
def test_adjoint_runs_every_tableau(solver):
    torch.manual_seed(0)
    m = MLP(dim=2, hidden=16, depth=2).double()
    x0 = torch.randn(4, 2, dtype=F64)
    a = adjoint_gradients(m, lambda x: (x ** 2).sum(1), x0, 6, solver, method="adjoint")
    b = adjoint_gradients(m, lambda x: (x ** 2).sum(1), x0, 6, solver, method="backprop")
    torch.testing.assert_close(a["x1"], b["x1"], rtol=1e-12, atol=1e-12)
    assert float((a["x0"] - b["x0"]).norm() / b["x0"].norm()) < 5e-2


# ----------------------------------------------------------------------------- costs
def _old_nfe(name, n, **opts):
    """The exact NFE formulas as they stood before costs were declared at registration."""
    if name == "heun":
        return 2 * n - (1 if opts.get("final_euler") else 0)
    if name in ("ab2", "ab3", "ab4"):
        k = int(name[-1])
        if opts.get("warmup", "minimal") == "rk4":
            return 4 * min(n, k - 1) + max(n - (k - 1), 0)
        return {2: n, 3: n + 1 if n >= 2 else 2, 4: n + 4 if n >= 2 else 3}[k]
    if name == "plms":
        return 4 * min(n, 3) + max(n - 3, 0)
    if name == "heun_pc":
        e = opts.get("exact_steps", 1)
        return 2 * n if n <= e else n + e
    return get_solver(name).evals_per_step * n


OPTIONS = {"heun": [{}, {"final_euler": True}], "ab2": [{}, {"warmup": "rk4"}], "ab3": [{}, {"warmup": "rk4"}],
           "ab4": [{}, {"warmup": "rk4"}], "heun_pc": [{}, {"exact_steps": 3}]}


def test_declared_costs_equal_the_previous_nfe_for_every_solver():
    for name in available():
        spec = get_solver(name)
        assert spec.adaptive == (name == "dopri5"), name
        if spec.adaptive:
            continue
        for opts in OPTIONS.get(name, [{}]):
            old = [_old_nfe(name, n, **opts) for n in range(1, 31)]
            if name in ("dpm++2s", "dpm++3s"):
                # on purpose: these had no declared cost and the old count was the nominal
                # evals_per_step * steps; the exact count (read off the protocol) is lower by the two
                # first-order end steps (from lam = -inf, into lam = +inf) of the [0, 1] grid
                e = get_solver(name).evals_per_step
                old = [e * n - (e - 1) * min(n, 2) for n in range(1, 31)]
            assert [spec.nfe(n, **opts) for n in range(1, 31)] == old, (name, opts)
            assert [exact_nfe(name, n, **opts) for n in range(1, 31)] == [spec.nfe(n, **opts) for n in range(1, 31)]
            for budget in range(1, 40):
                s = steps_for_nfe(name, budget, **opts)
                assert s == 1 or spec.nfe(s, **opts) <= budget < spec.nfe(s + 1, **opts)


def test_costs_match_counted_calls_where_every_step_costs_its_nominal_evaluations():
    field = lambda x, t: -x  # noqa: E731
    for name in ("euler", "midpoint", "heun", "rk4", "ab2", "ab3", "ab4", "plms", "heun_pc", "hb", "ghvb"):
        for opts in OPTIONS.get(name, [{}]):
            for n in (1, 2, 3, 4, 7):
                assert sample(field, torch.ones(2, 2, dtype=F64), solver=name, steps=n, **opts).nfe \
                    == get_solver(name).nfe(n, **opts), (name, opts, n)


def test_adaptive_solvers_have_no_exact_cost():
    with pytest.raises(ValueError, match="adaptive"):
        exact_nfe("dopri5", 4)
    with pytest.raises(ValueError, match="adaptive"):
        steps_for_nfe("rk45", 40)


# ----------------------------------------------------------------------------- counting
class _Probe:
    def __init__(self):
        self.ts = []

    def __call__(self, x, t, **cond):
        self.ts.append(t)
        return x * (1 + t.reshape(-1, 1)) + cond.get("shift", 0.0)


@pytest.mark.parametrize("t", [0.25, torch.tensor(0.25), torch.tensor([0.25]), torch.full((5,), 0.25)],
                         ids=["float", "0-d", "1-element", "batch"])
def test_counted_velocity_takes_every_form_of_t(t):
    m = _Probe()
    f = CountedVelocity(m, {"shift": 1.0}, check_finite=False)
    x = torch.ones(5, 2, dtype=F64)
    v = f(x, t)
    assert m.ts[0].shape == (5,) and m.ts[0].dtype == F64 and torch.all(m.ts[0] == 0.25)
    torch.testing.assert_close(v, torch.full((5, 2), 2.25, dtype=F64))
    f(x, t, shift=0.0)  # per-call conditioning overrides the fixed one
    assert f.nfe == f.calls == 2 and f.rows == 10
    f.reset()
    assert f.nfe == f.calls == f.rows == 0


def test_counted_velocity_charges_guided_rows():
    class Cond:
        null_class = 3

        def __call__(self, x, t, y=None):
            return x * (1 + y.reshape(-1, 1).to(x.dtype))

    f = CountedVelocity(ClassifierFreeGuidance(Cond(), 2.0, interval=(0.0, 0.5)), {"y": torch.zeros(4, dtype=torch.long)})
    x = torch.ones(4, 2, dtype=F64)
    f(x, 0.25)
    f(x, 0.75)  # outside the interval: one conditional row per sample
    assert f.calls == 2 and f.nfe == 3 and f.rows == 12


# ----------------------------------------------------------------------------- initial noise
def _old(shape, seed, dtype=None):
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)), dtype=dtype)


def test_initial_noise_is_the_old_draw():
    x, g = initial_noise((3, 4), seed=7)
    assert torch.equal(x, _old((3, 4), 7)) and g.device.type == "cpu"
    assert torch.equal(initial_noise([3, 4])[0], _old((3, 4), 0))  # no seed: seed 0
    assert torch.equal(initial_noise((3, 4), 7, dtype=F64, device="cpu")[0], _old((3, 4), 7, F64))
    gen = torch.Generator().manual_seed(5)
    x, g = initial_noise((2, 2), seed=99, generator=gen)  # a generator wins over the seed, and is returned
    ref = torch.Generator().manual_seed(5)
    assert g is gen and torch.equal(x, torch.randn((2, 2), generator=ref))
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=ref))  # callers go on drawing
    t = torch.zeros(2, 2)
    assert initial_noise(t, seed=3)[0] is t and initial_noise(t, generator=gen)[1] is gen
    with pytest.raises(TypeError, match="floating-point"):
        initial_noise(torch.zeros(2, dtype=torch.long))


def test_initial_noise_call_sites_draw_what_they_drew_before(oracle):
    # sample(): default dtype, CPU generator from the seed
    torch.testing.assert_close(sample(oracle, (16, 2), steps=2, seed=5).x,
                               sample(oracle, _old((16, 2), 5), steps=2).x, rtol=0, atol=0)
    # report.sample_like: the noise, then the labels from the same generator
    model = lambda x, t, y=None: -x  # noqa: E731
    xs, ys, _ = sample_like(model, 6, (2,), 11, "euler", 1, num_classes=3)
    g = torch.Generator().manual_seed(11)
    n = torch.randn((6, 2), generator=g)
    assert torch.equal(ys, torch.randint(3, (6,), generator=g)) and torch.equal(xs, sample(model, n, steps=1).x)
    # fast_sample: like sample()
    img = lambda x, t, **k: -x  # noqa: E731
    assert torch.equal(fast_sample(img, (2, 1, 4, 4), steps=2, seed=4).x, fast_sample(img, _old((2, 1, 4, 4), 4), steps=2).x)
    # inverse problems: the measurement's dtype and device
    op = make_operator("inpaint_box", (1, 8, 8))
    y = torch.zeros(2, 1, 8, 8, dtype=F64)
    zero = lambda x, t, **k: torch.zeros_like(x)  # noqa: E731
    r = inverse.restore("flowchef", zero, op, y, memory=False, steps=1, seed=3)
    assert torch.equal(r.x, _old((2, 1, 8, 8), 3, F64))
    # RF-Inversion's target noise: the data's dtype
    x1 = torch.randn(8, 2, dtype=F64)
    assert torch.equal(rf_invert(oracle, x1, gamma=0.5, steps=2, seed=4).info["target_noise"], _old((8, 2), 4, F64))


def test_class_swap_gamma_noise_is_seeded(oracle):
    class Lab:
        num_classes, null_class = 2, 2

        def __call__(self, x, t, y=None):
            return oracle(x, t)

    x = torch.randn(8, 2, dtype=F64)
    a = class_swap_edit(Lab(), x, 0, 1, steps=3, gamma=0.4, seed=2)
    b = class_swap_edit(Lab(), x, 0, 1, steps=3, gamma=0.4, seed=2)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe == 2 * 3 * 2


# ----------------------------------------------------------------------------- log-SNR toolkit
def test_logsnr_helpers():
    for k in (1, 2, 3):  # the series (|h| < 1) and the recursion agree across h = 1
        assert math.isclose(hphi(k, 1.0 - 1e-9), hphi(k, 1.0), rel_tol=1e-7)
    assert math.isclose(hphi(1, 2.0), 1 - math.exp(-2.0)) and math.isclose(hphi(2, 2.0), 2.0 - (1 - math.exp(-2.0)))
    path = get_path("cosine")
    ts = [0.0, 0.3, 0.7, 1.0]
    pts = alpha_sigma_lambda(path, ts)
    assert pts[0][2] == -math.inf and pts[-1][2] == math.inf and pts[0][0] == 0.0 and pts[-1][1] == 0.0
    assert math.isclose(pts[1][2], math.log(pts[1][0] / pts[1][1]))
    x1, x0 = torch.randn(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64)
    for t, c in zip(ts[1:3], x1_coefficients(path, ts[1:3])):  # x1_hat recovers x1 from (x_t, v_t)
        tt = torch.tensor(t, dtype=F64)
        xt = path.alpha(tt) * x1 + path.sigma(tt) * x0
        v = path.d_alpha(tt) * x1 + path.d_sigma(tt) * x0
        torch.testing.assert_close(x1_from_velocity(c, xt, v), x1, rtol=1e-12, atol=1e-12)


def test_solver_registry_still_lists_everything():
    assert {"euler", "midpoint", "heun", "rk4", "dopri5", "dpm++2m", "unipc", "deis"} <= set(sf.solvers.available())
