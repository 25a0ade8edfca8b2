"""``straightflow train | sample | invert | eval | list``: train a flow, sample it, measure it."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import data as sfdata, models, plotting, report
from ..images.latent import is_latent_run, load_latent
from ..optimize import DEFAULT_BUDGET_S, calibrate, calibrated_grid
from .calibrate import calibration_file, pick_calibration, valid_calibration
from ..runs import train_recipe
from ..report import steps_for
from ..solvers import AUTO, available as solver_names, get_solver, initial_noise, resolve_auto, sample
from ..straighten.meanflow import sample_mean
from ..system import machine_line
from ..train import max_steps_cap
from . import flags, nf as nf_cli
from .listing import families


CALIBRATE_NFES = (4, 8)  # the NFEs users sample at: `train` ends by calibrating them
CALIBRATE_SHARE = 0.25  # the calibration adds at most this share of the training's wall time
MIN_CALIBRATE_S = 2.0  # CPU s per NFE below which a calibration cannot fit anything worth storing


def cmd_train(a: argparse.Namespace) -> int:
    if nf_cli.is_nf_model(a.model):  # normalizing flows: exact-likelihood trainer (cli/nf.py)
        return nf_cli.cmd_train(a)
    t0 = time.perf_counter()
    res = train_recipe(flags.recipe(a), a.out, allow_recipe_change=a.allow_recipe_change)
    wall = time.perf_counter() - t0
    print(train_summary(res))
    if not a.no_calibrate:
        calibrate_after_training(res, wall, a.calibrate_nfe, progress=not a.quiet)
    return 0


def calibrate_after_training(res, wall_s: float, nfes: Sequence[int], progress: bool = True) -> list:
    """``straightflow train``'s last part: calibrate the run at ``nfes`` (the learned kind from the best fixed
    solver) so that ``sample RUN --nfe K`` finds a fitted solver. The CPU budget, split over the NFEs, is the
    library default capped at 25% of the training's measured wall time (CPU seconds >= wall seconds for a
    busy process, so the calibration adds at most 25% to the wall time). Skipped with a one-line reason:
    under the smoke-test step cap, for runs that take no calibration (average-velocity, latent, a
    class-conditional model with no null class), when nothing was trained, or when the budget is below
    2 CPU s per NFE (short runs: ``straightflow calibrate`` does it on demand). Returns the calibrations."""
    run = res.run_dir
    if run is None:
        return []
    nfes = sorted(set(int(k) for k in nfes))
    later = f"`straightflow calibrate {run} --nfe {nfes[0] if nfes else 4}`"
    model, info = flags.load_run(str(run))
    reason = None
    if max_steps_cap() is not None:
        reason = f"the smoke-test step cap is on: not calibrating (run {later} for a fitted solver)"
    elif info.average_velocity:
        reason = f"an average-velocity ({info.objective}) run samples with its own jumps: nothing to calibrate"
    elif is_latent_run(str(run)):
        reason = f"a latent run: calibrate its latent flow with {later}"
    elif getattr(model, "num_classes", None) and getattr(model, "null_class", None) is None:
        reason = f"a class-conditional model with no null class: calibrate with {later} (it draws labels)"
    elif res.resumed_from is not None and res.resumed_from >= res.steps:
        reason = "nothing was trained: the stored calibrations (if any) still apply"
    if reason is None and not nfes:
        return []
    cap = CALIBRATE_SHARE * wall_s
    total = min(DEFAULT_BUDGET_S * len(nfes), cap)
    per = total / max(1, len(nfes))
    if reason is None and per < MIN_CALIBRATE_S:
        reason = (f"training took {wall_s:.1f} s: {int(CALIBRATE_SHARE * 100)}% of it ({total:.1f} CPU s) is too "
                  f"little to calibrate NFE {', '.join(map(str, nfes))}; run {later} for a fitted solver")
    if reason is not None:
        print(f"calibration skipped: {reason}", flush=True)
        return []
    print(f"calibrating NFE {', '.join(map(str, nfes))} for fast sampling (budget ~{total:.0f} CPU s; "
          "--no-calibrate to skip)", flush=True)
    kw = {"path": info.path, "progress": progress, "noise_or_shape": (1, *info.shape)}
    k = getattr(model, "num_classes", None)
    if k:  # labels cycled through the classes, as `sample` draws them, for every self-sized batch
        kw["cond"] = lambda n, _k=int(k): {"y": torch.arange(n) % _k}
    out = []
    for nfe in nfes:
        c0 = time.process_time()
        try:
            cal = calibrate(str(run), "learned", "auto", nfe, budget_s=per, **kw)
        except (ValueError, RuntimeError, TypeError, FloatingPointError) as e:
            print(f"NFE {nfe}: calibration failed ({e}); the run is trained, sample it with --nfe {nfe} (solver auto)",
                  flush=True)
            continue
        print(calibration_line(cal, run, time.process_time() - c0), flush=True)
        out.append(cal)
    return out


def calibration_line(cal, run, cpu_s: float) -> str:
    """One line: a calibration's held-out RMSE against its start's, its cost and its file."""
    h = cal.info.get("holdout_rmse") or {}
    start = cal.info.get("initial_solver") or cal.solver
    if isinstance(h, dict) and h.get("init") and h.get("fitted"):
        fit = (f"held-out RMSE {h['fitted']:.3g} vs {h['init']:.3g} for {start} ({h['init'] / h['fitted']:.2f}x lower)"
               + (" - no better: it is the start itself" if cal.info.get("fallback") else ""))
    elif cal.holdout_rmse is not None:
        fit = f"held-out RMSE {cal.holdout_rmse:.3g}"
    else:
        fit = "no held-out RMSE recorded"
    return f"NFE {cal.budget_nfe}: {cal.kind} ({start}), {fit}; {cpu_s:.1f} CPU s; {calibration_file(run, cal)}"


def train_summary(res) -> str:
    """One line saying what a training call did: trained from scratch, resumed (and from where, with
    which allowed changes), or found the run already finished."""
    if res.resumed_from is None:
        return f"trained {res.steps} steps, final loss {res.final_loss:.4f}; run written to {res.run_dir}"
    if res.resumed_from >= res.steps:
        return (f"{res.run_dir} was already trained to step {res.resumed_from}; nothing trained (pass a larger "
                "--steps to continue it)")
    changes = f" with the allowed changes {'; '.join(res.recipe_changes)}" if res.recipe_changes else ""
    return (f"resumed {res.run_dir} from step {res.resumed_from}{changes} and trained to step {res.steps}, final "
            f"loss {res.final_loss:.4f}")


def _is_auto(name) -> bool:
    return isinstance(name, str) and name.strip().lower() == AUTO


def _labels(model, n: int, label) -> dict:
    k = getattr(model, "num_classes", None)
    if not k:
        return None
    if label is None:
        return {"y": torch.arange(n) % k}
    if not 0 <= label < k:
        raise ValueError(f"--label must be in [0, {k}), got {label}")
    return {"y": torch.full((n,), label, dtype=torch.long)}


DEFAULT_SOLVER, DEFAULT_STEPS = "euler", 8  # `sample RUN` with neither --solver, --steps nor --nfe


def sampling_plan(a: argparse.Namespace, info) -> tuple:
    """What ``straightflow sample`` runs: ``(calibration or None, solver name, steps, grid, notes)``.

    ``--nfe K`` is a budget in evaluations for every solver: with ``--solver X``, X at the most steps
    within K; otherwise the valid stored calibration for K (the run's current weights, this sample shape
    and guidance scale), else solver ``auto`` for K. ``note`` is the one line that says which and why (a
    stale calibration: ignored, and why). ``--calibrated`` requires a stored calibration (refusing a stale
    one); ``--steps`` with ``--nfe`` or ``--calibrated`` is refused, as is ``--solver`` with ``--calibrated``."""
    explicit_grid = a.grid != "uniform"
    if a.steps is not None and a.nfe is not None:
        raise ValueError("give --nfe (a budget in evaluations, for any solver) or --steps (solver steps), not both")
    if a.calibrated:
        if info.average_velocity:
            raise ValueError(f"{a.run} is an average-velocity ({info.objective}) run: its sampler takes no calibration")
        if a.steps is not None:
            raise ValueError("--calibrated runs the stored calibration at its own NFE: choose it with --nfe, not --steps")
        if a.solver is not None or explicit_grid:
            raise ValueError("--calibrated replaces --solver and --grid (the calibration fixes its own update and "
                             "times); drop them, or drop --calibrated")
        cal = pick_calibration(a.run, a.nfe, a.guidance, shape=info.shape, verify=True)
        return cal, None, None, None, [f"using calibration {calibration_file(a.run, cal)}: {_cal_summary(cal)}"]
    if a.nfe is None:
        name = a.solver or DEFAULT_SOLVER
        if _is_auto(name):
            raise ValueError("--solver auto picks the best fixed solver for an NFE budget: give it with --nfe")
        return None, get_solver(name).name, a.steps or DEFAULT_STEPS, a.grid, []
    k = a.nfe
    if info.average_velocity:  # one evaluation per jump
        if a.solver is not None:
            raise ValueError(f"{a.run} is an average-velocity ({info.objective}) run: it samples with its own jumps "
                             "(no --solver)")
        return None, None, k, a.grid, []
    if a.solver is not None and not _is_auto(a.solver):
        spec = get_solver(a.solver)
        return None, spec.name, steps_for(spec, k), a.grid, []
    if explicit_grid:
        raise ValueError(f"--grid {a.grid} needs a named --solver (a calibration and solver auto fix their own times)")
    notes = []
    if a.solver is None:
        cal, stale = valid_calibration(a.run, k, a.guidance, shape=info.shape)
        notes = [stale] if stale else []
        if cal is not None:
            return cal, None, None, None, notes + [
                f"using calibration {calibration_file(a.run, cal)}: {_cal_summary(cal)} (--solver X overrides)"]
    name, steps, _ = resolve_auto(k)
    why = "solver auto" if a.solver is not None else f"no valid calibration for NFE {k}: solver auto"
    line = (f"{why} -> {name}, {steps} steps (the best fixed solver at NFE {k}, docs/solvers-auto.md)"
            + ("" if a.solver is not None else f"; `straightflow calibrate {a.run} --nfe {k}` fits one"))
    return None, name, steps, a.grid, notes + [line]


def _cal_summary(cal) -> str:
    rmse = f", held-out RMSE {cal.holdout_rmse:.3g}" if cal.holdout_rmse is not None else ""
    start = cal.info.get("initial_solver") or cal.solver
    return f"{cal.kind} ({start}) at NFE {cal.nfe}{rmse}"


def cmd_sample(a: argparse.Namespace) -> int:
    if nf_cli.is_nf_run(a.run):  # --solver sequential|gs-jacobi (cli/nf.py)
        return nf_cli.cmd_sample(a)
    dev = flags.device(a)
    model, info = flags.load_run(a.run, device=dev)
    cal, solver, steps, grid, notes = sampling_plan(a, info)
    n = a.n
    noise, _ = initial_noise((n, *info.shape), seed=a.seed)
    cond = _labels(model, n, a.label)
    if cond is None and (a.guidance is not None or a.label is not None):
        raise ValueError("--label/--guidance need a class-conditional model")
    if grid == "boss" and solver is not None:  # Bellman-optimal grid for this solver and NFE, cached beside the model
        grid = calibrated_grid(a.run, solver, get_solver(solver).nfe(steps))
    for line in notes:
        print(line, flush=True)
    on_dev = {"y": cond["y"].to(dev)} if cond else None
    progress = flags.step_progress(steps or 0, not a.quiet)
    try:
        with torch.no_grad():
            if info.average_velocity:  # a MeanFlow-type run: jump with its average velocity u(x, t_next, t)
                if a.guidance is not None:
                    raise ValueError(f"{a.run} is an average-velocity ({info.objective}) run: sample it without --guidance")
                res = sample_mean(model, noise.to(dev), steps=steps, cond=on_dev, grid=grid)
                label = f"{info.objective} (average velocity)"
            elif cal is not None:
                res = sample(model, noise.to(dev), solver=cal, cond=on_dev, guidance=a.guidance)
                label = f"calibrated {cal.kind} ({cal.info.get('initial_solver') or cal.solver})"
            else:
                res = sample(model, noise.to(dev), solver=solver, steps=steps, grid=grid, cond=on_dev,
                             guidance=a.guidance, path=info.path, callback=progress)
                label = solver
    finally:
        if progress is not None:
            progress.close()
    res.x = res.x.cpu()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": res.x.numpy(), "noise": noise.numpy()}
    if cond:
        arrays["y"] = cond["y"].numpy()
    np.savez(out.with_suffix(".npz"), **arrays)
    title = f"{label}, NFE {res.nfe}" if cal is not None else f"{label}, {steps} steps, NFE {res.nfe}"
    if res.x.ndim == 4:
        plotting.save_image_panels([(title, res.x[:100])], out)
    else:
        ref = report.reference_data(info.data_source, n, seed=info.seed)
        plotting.save_scatter_panels([(title, res.x[:, :2])], out, reference=ref.x[:, :2])
    print(f"{n} samples, NFE {res.nfe}: {out} and {out.with_suffix('.npz')}")
    return 0


def cmd_invert(a: argparse.Namespace) -> int:
    dev = flags.device(a)
    model, info = flags.load_run(a.run, device=dev)
    x0, _ = initial_noise((a.n, *info.shape), seed=a.seed, device=dev)
    cond = _labels(model, a.n, None)
    cond = {"y": cond["y"].to(dev)} if cond else None
    solvers = a.solvers.split(",") if a.solvers else [n for n in solver_names()
                                                      if not get_solver(n).stochastic and not get_solver(n).adaptive]
    if a.solvers:  # every named solver meets every budget exactly or below (never silently above): checked first
        for name in solvers:
            for k in a.nfe:
                steps_for(get_solver(name), k)
    rows = report.inversion_report(model, x0, solvers, a.nfe, cond=cond, path=info.path, progress=not a.quiet)
    return _report(f"# Inversion of `{a.run}`\n\n{a.n} samples generated by RK4 (200 steps) from known noise, "
                   f"inverted and regenerated with each solver; {machine_line()}\n\n"
                   + report.inversion_markdown(rows), a.out)


def cmd_eval(a: argparse.Namespace) -> int:
    if nf_cli.is_nf_run(a.run):  # bits/dim and FD with floor (cli/nf.py)
        return nf_cli.cmd_eval(a)
    dev = flags.device(a)
    model, info = flags.load_run(a.run, device=dev)
    latent = {}
    if is_latent_run(a.run):  # sample latents, decode, score the images
        lf = load_latent(a.run, device=dev)
        model, latent = lf.model, {"latent_shape": lf.latent_shape, "decode": lambda z: lf.decode(z).cpu()}
    ref = report.run_reference(info, max(2 * a.n, 4))
    rows, _ = report.evaluate_model(model, ref.data, a.nfe, solver=a.solver, n=a.n, seed=a.seed, metric=a.metric,
                                    grid=a.grid, extractor=a.extractor, path=info.path, floor_reference=ref.floor,
                                    **latent)
    m = rows[0].n if rows else a.n
    capped = f" (--n {a.n} capped at what the reference allows)" if m < a.n else ""
    return _report(f"# Evaluation of `{a.run}`\n\nScored against {ref.description}.  \n{m} samples per row{capped}; "
                   f"{machine_line()}\n\n" + report.rows_to_markdown(rows), a.out)


def _report(md: str, out) -> int:
    """Print a Markdown report and, with ``--out``, write it there too."""
    print(md)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(md)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    for family, names in families().items():
        print(f"{family}: {', '.join(names)}")
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="train a flow on a data set or a file")
    t.add_argument("--data", default="checkerboard",
                   help=f"a data set name ({', '.join(sfdata.available())}) or a .npz/.npy/IDX file or image folder")
    t.add_argument("--out", required=True, help="run directory (resumes if it holds a training state)")
    t.add_argument("--n", type=int, default=None, help="number of points for the 2D toys / subset size")
    t.add_argument("--resolution", type=flags.positive_int, default=None,
                   help="resize images to N x N (e.g. an image folder with mixed sizes); recorded in the run")
    t.add_argument("--model", default="auto", help=f"auto (MLP for vectors, UNet for images) or {', '.join(models.available())}")
    flags.add_model(t)
    flags.add_path_recipe(t)
    t.add_argument("--cond-dropout", type=float, default=None, help="label drop rate for CFG (default 0.1 if labelled)")
    nf_cli.add_train_flags(t)
    flags.add_train(t)
    t.add_argument("--no-calibrate", action="store_true",
                   help="do not end by calibrating the run for fast sampling (see --calibrate-nfe)")
    t.add_argument("--calibrate-nfe", type=flags.positive_ints, default=list(CALIBRATE_NFES),
                   help="NFEs to calibrate at the end (default 4,8), within min(the library's budget, 25%% of the "
                        "training wall time) CPU s; skipped for short or smoke-capped runs")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample a trained run: PNG (grid or scatter) + .npz")
    s.add_argument("run")
    s.add_argument("--n", type=flags.positive_int, default=1000, help="number of samples")
    flags.add_solver(s, solver=DEFAULT_SOLVER, steps=DEFAULT_STEPS, grid=False, nfe=True)
    s.add_argument("--grid", default="uniform",
                   help="a grid name (see `straightflow list`), or boss (calibrated for this run, cached)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--label", type=int, default=None, help="class label (default: cycle through classes)")
    s.add_argument("--calibrated", action="store_true",
                   help="require the solver `straightflow calibrate` stored beside the run (replaces --solver; "
                        "--nfe chooses which, default: the only NFE stored; a stale one is refused)")
    flags.add_seed(s)
    flags.add_device(s)
    flags.add_quiet(s)
    s.add_argument("--out", default="samples.png")
    nf_cli.add_sample_flags(s)
    s.set_defaults(fn=cmd_sample)

    iv = sub.add_parser("invert", help="inversion reconstruction-error report for every deterministic solver")
    iv.add_argument("run")
    iv.add_argument("--solvers", default=None, help="comma-separated solver names (default: all deterministic)")
    iv.add_argument("--nfe", type=flags.positive_ints, default=[4, 8, 16, 32],
                    help="NFE budgets (comma-separated, each >= 1; default 4,8,16,32): each solver at the most steps "
                         "within each")
    iv.add_argument("--n", type=flags.positive_int, default=256, help="samples generated and inverted")
    flags.add_seed(iv)
    flags.add_device(iv)
    flags.add_quiet(iv)
    iv.add_argument("--out", default=None, help="also write the Markdown table here")
    iv.set_defaults(fn=cmd_invert)

    e = sub.add_parser("eval", help="score a run at several NFE against held-out data, with the floor")
    e.add_argument("run")
    e.add_argument("--nfe", type=flags.ints, default=[1, 2, 4, 8, 100],
                   help="NFE budgets (comma-separated, each >= 1; default 1,2,4,8,100): the solver at the most steps "
                        "within each")
    e.add_argument("--solver", default="euler", help=f"one of: {', '.join(solver_names())}")
    e.add_argument("--grid", default="uniform", help="a grid name (see `straightflow list`)")
    e.add_argument("--n", type=flags.positive_int, default=2000,
                   help="samples per NFE (capped at what the reference data allows)")
    e.add_argument("--metric", default=None, help="default w2 (vectors) / fd (images); see `straightflow list`")
    e.add_argument("--extractor", default="digits", help="classifier for fd: digits or mnist")
    flags.add_seed(e)
    flags.add_device(e)
    flags.add_quiet(e)
    e.add_argument("--out", default=None, help="also write the Markdown table here")
    e.set_defaults(fn=cmd_eval)


def register_list(sub) -> None:
    li = sub.add_parser("list", help="list every registered name (data, models, paths, solvers, methods, suites)")
    li.set_defaults(fn=cmd_list)
