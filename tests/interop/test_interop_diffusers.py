"""straightflow <-> diffusers: the convention helpers, DiffusersVelocity and StraightflowScheduler.

Every model is a tiny randomly initialised SD3 or FLUX transformer built here (no download;
the pipeline tests also need ``transformers``, which the pipelines import). The
scheduler runs the registered straightflow solver itself, so a diffusers-style loop must give
exactly ``straightflow.sample``'s result with as many model calls as its NFE.
"""
import copy
import inspect
import math
import pickle
import threading
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")

import straightflow as sf  # noqa: E402
from straightflow.interop import (  # noqa: E402
    DiffusersVelocity, StraightflowScheduler, diffusers_from_velocity, sigma_from_t, t_from_sigma,
    t_from_timestep, timestep_from_t, velocity_from_diffusers,
)
from straightflow.interop.scheduler import _evaluation_schedule  # noqa: E402
from straightflow.solvers import Eval  # noqa: E402
from straightflow.solvers.base import SolverSpec  # noqa: E402

B, C, H = 2, 4, 8
SOLVERS = ["euler", "heun", "midpoint", "dpm++2m", "unipc"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=H, patch_size=2, in_channels=C, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=C,
    ).eval()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, C, H, H, generator=g)
    cond = {"encoder_hidden_states": torch.randn(B, 5, 16, generator=g),
            "pooled_projections": torch.randn(B, 16, generator=g)}
    return model, noise, cond


class Counted:
    """Calls the transformer the way pipelines do and counts the calls."""

    def __init__(self, model, cond):
        self.model, self.cond, self.calls = model, cond, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.model(hidden_states=x, timestep=t.expand(x.shape[0]), **self.cond, return_dict=False)[0]


def diffusers_loop(scheduler, net, x, timesteps=None):
    for t in scheduler.timesteps if timesteps is None else timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    return x


# ---------------------------------------------------------------------- (a) conventions
def test_convention_round_trips():
    t = torch.rand(17, dtype=torch.float64)
    assert torch.equal(t_from_sigma(sigma_from_t(t)), t)
    assert torch.allclose(t_from_timestep(timestep_from_t(t, 1000), 1000), t, atol=1e-15)
    assert timestep_from_t(0.0) == 1000 and timestep_from_t(1.0) == 0 and sigma_from_t(0.25) == 0.75
    v = torch.randn(3, 4)
    assert torch.equal(velocity_from_diffusers(diffusers_from_velocity(v)), v)
    # the two conventions describe the same path and the same regression target
    x_data, noise = torch.randn(3, 4), torch.randn(3, 4)
    tt = torch.rand(3)
    x_t, u_t = sf.get_path("linear").interpolate(noise, x_data, tt)
    sigma = sigma_from_t(tt)[:, None]
    assert torch.allclose(x_t, (1 - sigma) * x_data + sigma * noise, atol=1e-6)
    assert torch.allclose(diffusers_from_velocity(u_t), noise - x_data)  # diffusers' training target


# ---------------------------------------------------------------------- (b) DiffusersVelocity
@torch.no_grad()
def test_sample_euler_matches_flow_match_euler(tiny):
    model, noise, cond = tiny
    steps = 6
    res = sf.sample(DiffusersVelocity(model), noise, solver="euler", steps=steps, cond=cond)
    grid = sf.grids.make_grid("uniform", steps)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref.set_timesteps(sigmas=sigma_from_t(grid[:-1]).tolist())
    assert torch.allclose(ref.sigmas.double(), sigma_from_t(grid), atol=1e-7)
    x = diffusers_loop(ref, Counted(model, cond), noise)
    assert res.nfe == steps
    assert (x - res.x).abs().max().item() < 1e-5


@torch.no_grad()
def test_diffusers_velocity_forms(tiny):
    model, noise, cond = tiny
    v = DiffusersVelocity(model, **cond)
    t = torch.full((B,), 0.3)
    out = model(hidden_states=noise, timestep=timestep_from_t(t), **cond).sample
    assert torch.equal(v(noise, t), -out)
    assert torch.equal(v(noise, torch.tensor(0.3)), -out)  # scalar t is broadcast
    tup = DiffusersVelocity(lambda hidden_states, timestep: (hidden_states * timestep[:, None, None, None],))
    assert torch.allclose(tup(noise, t), -noise * 700.0, rtol=1e-6)


# ---------------------------------------------------------------------- (c) the scheduler in a loop
@pytest.mark.parametrize("solver", SOLVERS)
@torch.no_grad()
def test_scheduler_loop_equals_sample(tiny, solver):
    model, noise, cond = tiny
    steps = 5
    res = sf.sample(DiffusersVelocity(model), noise, solver=solver, steps=steps, cond=cond)
    sch = StraightflowScheduler(solver=solver)
    sch.set_timesteps(steps)
    assert len(sch.timesteps) == res.nfe == sch.order * steps
    t_eval = torch.tensor(sch.evaluation_times + [1.0], dtype=torch.float64)
    assert torch.allclose(sch.sigmas.double(), sigma_from_t(t_eval), atol=1e-7)
    net = Counted(model, cond)
    x = diffusers_loop(sch, net, noise)
    assert net.calls == res.nfe
    assert (x - res.x).abs().max().item() <= 1e-6
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sch.step(net(x, sch.timesteps[-1]), sch.timesteps[-1], x)


@torch.no_grad()
def test_heun_schedule_has_two_entries_per_step():
    sch = StraightflowScheduler(solver="heun")
    sch.set_timesteps(3)
    t = [0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0]
    assert sch.evaluation_times == pytest.approx(t)
    assert sch.timesteps.tolist() == pytest.approx([1000 * (1 - s) for s in t], abs=1e-3)
    assert sch.order == 2 and sch.num_inference_steps == 3


@torch.no_grad()
def test_shift_and_dynamic_shift_like_flow_match_euler(tiny):
    model, noise, cond = tiny
    n = 5
    sigmas = torch.linspace(1.0, 1.0 / n, n).tolist()  # what FLUX passes
    cases = [({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.8)]
    if "time_shift_type" in inspect.signature(diffusers.FlowMatchEulerDiscreteScheduler.__init__).parameters:
        cases.append(({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.7))
    for kw, mu in cases:
        ref = diffusers.FlowMatchEulerDiscreteScheduler(**kw)
        ref.set_timesteps(sigmas=sigmas, mu=mu)
        sch = StraightflowScheduler.from_config(ref.config, solver="euler")
        assert sch.config.solver == "euler" and sch.shift == ref.shift
        sch.set_timesteps(sigmas=sigmas, mu=mu)
        assert torch.allclose(sch.timesteps, ref.timesteps, atol=1e-3)
        assert torch.allclose(sch.sigmas, ref.sigmas, atol=1e-6)
        x_ref = diffusers_loop(ref, Counted(model, cond), noise)
        x = diffusers_loop(sch, Counted(model, cond), noise)
        assert (x - x_ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="mu"):
        StraightflowScheduler(use_dynamic_shifting=True).set_timesteps(4)


@pytest.mark.parametrize("kw", [
    {"shift": 3.0, "shift_terminal": 0.1}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
    {"shift": 2.0, "shift_terminal": 0.05, "use_beta_sigmas": True}, {"use_dynamic_shifting": True, "shift_terminal": 0.2},
])
def test_flow_match_sigma_options_from_config(tiny, kw):
    """from_config of a FlowMatchEuler config used to drop shift_terminal and the karras / exponential /
    beta spacings while its config still reported them: the sigmas were plain shifted ones."""
    if kw.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    model, noise, cond = tiny
    n, mu = 6, (0.8 if kw.get("use_dynamic_shifting") else None)
    sigmas = torch.linspace(1.0, 1.0 / n, n).tolist()
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**kw)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    sch = StraightflowScheduler.from_config(ref.config, solver="euler")
    assert all(sch.config[k] == ref.config[k] for k in kw)
    sch.set_timesteps(sigmas=sigmas, mu=mu)
    assert torch.allclose(sch.sigmas, ref.sigmas, atol=1e-6), (sch.sigmas, ref.sigmas)
    assert torch.allclose(sch.timesteps, ref.timesteps, atol=1e-3)
    x_ref = diffusers_loop(ref, Counted(model, cond), noise)
    x = diffusers_loop(sch, Counted(model, cond), noise)
    assert (x - x_ref).abs().max().item() < 1e-5


def test_flow_match_options_refused_or_checked():
    for kw, match in (({"invert_sigmas": True}, "invert_sigmas"), ({"stochastic_sampling": True}, "stochastic"),
                      ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one"),
                      ({"shift_terminal": 1.5}, "shift_terminal")):
        with pytest.raises(ValueError, match=match):
            StraightflowScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler().config, **kw)
    # grid="shifted" with its own shift and the scheduler's shift: refused (it used to shift twice)
    with pytest.raises(ValueError, match="twice"):
        StraightflowScheduler(grid="shifted", shift=3.0, grid_options={"shift": 3.0})
    a = StraightflowScheduler(grid="shifted", grid_options={"shift": 3.0})
    b = StraightflowScheduler(shift=3.0)
    a.set_timesteps(5)
    b.set_timesteps(5)
    assert torch.allclose(a.sigmas, b.sigmas)


def test_explicit_timesteps_are_what_the_model_sees(tiny, caplog):
    """FlowMatchEuler passes explicit timesteps to the model unshifted; ours used to shift them."""
    ts = [1000.0, 800.0, 500.0, 200.0]
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(timesteps=ts)
    sch = StraightflowScheduler(shift=3.0)
    with caplog.at_level("WARNING"):
        sch.set_timesteps(timesteps=ts)
    assert torch.allclose(sch.timesteps, ref.timesteps) and torch.allclose(sch.timesteps, torch.tensor(ts))
    assert "StraightflowScheduler: `timesteps` without `sigmas` are used as given" in caplog.text
    plain = StraightflowScheduler()
    plain.set_timesteps(timesteps=ts)
    assert torch.allclose(plain.sigmas, sch.sigmas)


@torch.no_grad()
def test_img2img_start_with_scale_noise_and_begin_index(tiny):
    model, noise, cond = tiny
    data = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(3))
    sch = StraightflowScheduler(solver="heun")
    sch.set_timesteps(6)
    start = 2 * sch.order  # the pipelines' t_start * scheduler.order
    sch.set_begin_index(start)
    t0 = sch.timesteps[start:start + 1]
    x = sch.scale_noise(data, t0.repeat(B), noise)
    t = sch.grid[2]
    assert torch.allclose(x, t * data + (1 - t) * noise, atol=1e-6)
    out = diffusers_loop(sch, Counted(model, cond), x, sch.timesteps[start:])
    res = sf.sample(DiffusersVelocity(model), x, solver="heun", grid=torch.tensor(sch.grid[2:]), steps=None, cond=cond)
    assert (out - res.x).abs().max().item() <= 1e-6
    # without set_begin_index the start is found from the first timestep (t = grid[2] is also
    # where Heun's step 1 ends: the scheduler picks the evaluation that begins a step)
    sch.set_timesteps(6)
    assert sch.timesteps[start - 1] == sch.timesteps[start]
    out2 = diffusers_loop(sch, Counted(model, cond), x, sch.timesteps[start:])
    assert torch.equal(out2, out)
    sch.set_timesteps(6)
    sch.set_begin_index(1)  # inside Heun's first step
    with pytest.raises(ValueError, match="inside a step"):
        sch.step(torch.zeros_like(x), sch.timesteps[1], x)


@torch.no_grad()
def test_lifecycle_no_threads_reset_copy_and_changed_state(tiny):
    model, noise, cond = tiny
    net = Counted(model, cond)
    base = threading.active_count()
    sch = StraightflowScheduler(solver="unipc")
    sch.set_timesteps(4)
    x = noise
    for t in sch.timesteps[:2]:
        x = sch.step(net(x, t), t, x).prev_sample
    assert threading.active_count() == base  # the solver is a coroutine: it runs inside step(), no worker thread
    for dup in (copy.deepcopy(sch), pickle.loads(pickle.dumps(sch))):  # the schedule, not the running solve
        assert torch.equal(dup.timesteps, sch.timesteps) and dup.step_index is None
        assert dup.config.solver == "unipc" and type(dup) is StraightflowScheduler
    sch.set_timesteps(4)  # a new schedule ends the solve in progress
    assert threading.active_count() == base
    with pytest.raises(ValueError, match="timestep"):
        sch.step(net(noise, sch.timesteps[0]), torch.tensor(123.0), noise)
    sch.set_timesteps(4)
    x = diffusers_loop(sch, net, noise)
    assert threading.active_count() == base
    # a state changed mid-step is refused; changed at a step boundary, the solver restarts there
    sch = StraightflowScheduler(solver="midpoint")
    sch.set_timesteps(3)
    t = sch.timesteps
    x1 = sch.step(net(noise, t[0]), t[0], noise).prev_sample
    with pytest.raises(ValueError, match="inside a step"):
        sch.step(net(x1 + 1, t[1]), t[1], x1 + 1)
    sch = StraightflowScheduler(solver="euler")
    sch.set_timesteps(3)
    t = sch.timesteps
    x1 = sch.step(net(noise, t[0]), t[0], noise).prev_sample
    x1 = 0.5 * x1
    x3 = diffusers_loop(sch, net, x1, t[1:])
    ref = sf.sample(DiffusersVelocity(model), x1, solver="euler", grid=torch.tensor(sch.grid[1:]), steps=None,
                    cond=cond)
    assert (x3 - ref.x).abs().max().item() <= 1e-6
    assert threading.active_count() == base


def test_interop_has_no_threads_or_queues():
    """The scheduler drives the solver coroutine inside ``step()``: nothing in interop/ needs a thread."""
    src = Path(sf.__file__).parent / "interop"
    for p in src.glob("*.py"):
        text = p.read_text()
        assert "import threading" not in text and "import queue" not in text, p.name


def test_rejects_unknown_and_adaptive_solvers(tiny):
    with pytest.raises(ValueError, match="unknown solver"):
        StraightflowScheduler(solver="nope")
    with pytest.raises(ValueError, match="adaptive"):  # declared adaptive in the registry: refused up front
        StraightflowScheduler(solver="dopri5").set_timesteps(4)

    def sneaky(x, ts):  # picks its next time from the state, like dopri5, but is not declared adaptive
        t = ts[0]
        while t < ts[-1]:
            v = yield Eval(x, t, 0)
            x = x + 0.1 * v
            t = min(ts[-1], t + 0.1 + 0.05 * math.tanh(float(v.abs().sum())))
        return x

    spec = SolverSpec("sneaky", sneaky, 1, 1)
    sched = _evaluation_schedule(spec, [0.0, 1.0], None)  # the trace (zero velocity): steps of 0.1
    assert sched[0] == (0.0, 0) and abs(sched[1][0] - 0.1) < 1e-12 and len(sched) >= 10
    # at run time its requests leave the traced schedule: step() notices and says so
    model, noise, cond = tiny
    sch = StraightflowScheduler(solver="euler")
    sch._spec = spec
    sch.set_timesteps(1)
    net = Counted(model, cond)
    with pytest.raises(RuntimeError, match="schedule is not fixed"):
        diffusers_loop(sch, net, noise)
    with pytest.raises(ValueError, match="adaptive"):
        _evaluation_schedule(SolverSpec("adaptive", sneaky, 1, 1, adaptive=True), [0.0, 1.0], None)


# ---------------------------------------------------------------------- (d) a real pipeline
@pytest.mark.parametrize("solver", ["heun", "unipc"])
@torch.no_grad()
def test_sd3_pipeline_end_to_end(tiny, solver):
    pytest.importorskip("transformers", reason="StableDiffusion3Pipeline imports transformers")
    model, noise, cond = tiny
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=model, scheduler=StraightflowScheduler(solver=solver), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    net = Counted(model, {})
    hook = model.register_forward_pre_hook(lambda *a: setattr(net, "calls", net.calls + 1))
    try:
        out = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                   latents=noise, num_inference_steps=4, guidance_scale=1.0, output_type="latent").images
    finally:
        hook.remove()
    res = sf.sample(DiffusersVelocity(model), noise, solver=solver, steps=4, cond=cond)
    assert net.calls == res.nfe
    assert (out - res.x).abs().max().item() <= 1e-6
    # classifier-free guidance (batched rows) runs too
    g = torch.Generator().manual_seed(5)
    out = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
               negative_prompt_embeds=torch.randn(B, 5, 16, generator=g),
               negative_pooled_prompt_embeds=torch.randn(B, 16, generator=g),
               latents=noise, num_inference_steps=3, guidance_scale=4.0, output_type="latent").images
    assert out.shape == noise.shape and torch.isfinite(out).all()


@torch.no_grad()
def test_flux_pipeline_dynamic_shift_end_to_end():
    """FLUX passes its own sigmas and ``mu`` (dynamic shifting) and feeds ``timestep / 1000``."""
    pytest.importorskip("transformers", reason="FluxPipeline imports transformers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()
    sch = StraightflowScheduler(solver="heun", use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=64)
    pipe = diffusers.FluxPipeline(transformer=model, scheduler=sch, vae=None, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    emb, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g)
    latents = torch.randn(1, 4, 16, generator=g)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        out = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, latents=latents, height=32, width=32,
                   num_inference_steps=4, output_type="latent").images
    finally:
        hook.remove()
    assert len(seen) == len(sch.timesteps) == 8
    assert sch.grid[1] < 0.25  # shifted towards the noise (mu > 0): uniform would be 0.25
    fixed = {k: v for k, v in seen[0].items() if k not in ("hidden_states", "timestep")}
    res = sf.sample(DiffusersVelocity(model, **fixed), latents, solver="heun", grid=torch.tensor(sch.grid), steps=None)
    assert res.nfe == 8
    assert (out - res.x).abs().max().item() < 1e-5


@torch.no_grad()
def test_calibration_runs_in_the_scheduler_and_a_pipeline(tiny):
    """A learned table fitted to the tiny transformer runs through StraightflowScheduler in a
    diffusers loop and in StableDiffusion3Pipeline, giving exactly ``sf.sample(..., solver=cal)``
    with NFE model calls; it refuses another NFE, another sample shape and a restart mid-way."""
    from straightflow.optimize import CalibrationMismatch, calibrate

    model, noise, cond = tiny
    vel = DiffusersVelocity(model)
    g = torch.Generator().manual_seed(9)
    xc, xh = torch.randn(B, C, H, H, generator=g), torch.randn(B, C, H, H, generator=g)
    with pytest.warns(UserWarning, match="float64"):  # its timestep embedding is float32: own precision
        cal = calibrate(vel, "learned", "auto", 4, xc, holdout=xh, cond=cond, holdout_cond=cond, mode="ls", rtol=1e-5)
    ref = sf.sample(vel, noise, solver=cal, cond=cond)
    assert ref.nfe == 4
    sch = StraightflowScheduler.from_calibration(cal)
    sch.set_timesteps(4)
    assert len(sch.timesteps) == 4
    net = Counted(model, cond)
    out = diffusers_loop(sch, net, noise)
    assert net.calls == 4 and (out - ref.x).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="NFE 4"):
        sch.set_timesteps(6)
    sch.set_timesteps(4)
    with pytest.raises(CalibrationMismatch, match="shape"):
        sch.step(torch.zeros_like(noise[:, :2]), sch.timesteps[0], noise[:, :2])
    sch.set_timesteps(4)
    sch.set_begin_index(2)
    with pytest.raises(ValueError, match="cannot start"):
        sch.step(torch.zeros_like(noise), sch.timesteps[2], noise)
    # the scheduler's config (JSON) carries the calibration: save/load round trip
    again = StraightflowScheduler.from_config(sch.config)
    again.set_timesteps(4)
    assert torch.equal(diffusers_loop(again, Counted(model, cond), noise), out)
    pytest.importorskip("transformers", reason="StableDiffusion3Pipeline imports transformers")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=model, scheduler=StraightflowScheduler.from_calibration(cal), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        img = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                   latents=noise, num_inference_steps=4, guidance_scale=1.0, output_type="latent").images
    finally:
        hook.remove()
    assert len(calls) == 4 and (img - ref.x).abs().max().item() <= 1e-6
