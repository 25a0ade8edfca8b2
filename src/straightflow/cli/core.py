"""``straightflow train | sample | invert | eval | list``: train a flow, sample it, measure it."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .. import data as sfdata, models, plotting, report
from ..images.latent import is_latent_run, load_latent
from ..optimize import calibrated_grid
from .calibrate import pick_calibration
from ..runs import train_recipe
from ..solvers import available as solver_names, get_solver, initial_noise, sample
from ..straighten.meanflow import sample_mean
from ..system import machine_line
from . import flags, nf as nf_cli
from .listing import families


def cmd_train(a: argparse.Namespace) -> int:
    if nf_cli.is_nf_model(a.model):  # normalizing flows: exact-likelihood trainer (cli/nf.py)
        return nf_cli.cmd_train(a)
    res = train_recipe(flags.recipe(a), a.out, allow_recipe_change=a.allow_recipe_change)
    print(train_summary(res))
    return 0


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


def _labels(model, n: int, label) -> dict:
    k = getattr(model, "num_classes", None)
    if not k:
        return None
    if label is None:
        return {"y": torch.arange(n) % k}
    if not 0 <= label < k:
        raise ValueError(f"--label must be in [0, {k}), got {label}")
    return {"y": torch.full((n,), label, dtype=torch.long)}


def cmd_sample(a: argparse.Namespace) -> int:
    if nf_cli.is_nf_run(a.run):  # --solver sequential|gs-jacobi (cli/nf.py)
        return nf_cli.cmd_sample(a)
    dev = flags.device(a)
    model, info = flags.load_run(a.run, device=dev)
    spec = get_solver(a.solver)
    n = a.n
    noise, _ = initial_noise((n, *info.shape), seed=a.seed)
    cond = _labels(model, n, a.label)
    if cond is None and (a.guidance is not None or a.label is not None):
        raise ValueError("--label/--guidance need a class-conditional model")
    grid = a.grid
    cal = None
    if a.calibrated:  # a solver fitted to this run by `straightflow calibrate`, stored beside it
        if info.average_velocity:
            raise ValueError(f"{a.run} is an average-velocity ({info.objective}) run: its sampler takes no calibration")
        cal = pick_calibration(a.run, a.nfe, a.guidance)  # sample() refuses changed weights before any work
    elif a.nfe is not None:
        raise ValueError("--nfe selects a stored calibration: use it with --calibrated (else --steps)")
    if grid == "boss":  # Bellman-optimal grid for this solver and NFE, calibrated once and kept beside the model
        grid = calibrated_grid(a.run, spec.name, spec.nfe(a.steps))
    on_dev = {"y": cond["y"].to(dev)} if cond else None
    progress = flags.step_progress(a.steps, not a.quiet)
    try:
        with torch.no_grad():
            if info.average_velocity:  # a MeanFlow-type run: jump with its average velocity u(x, t_next, t)
                if a.guidance is not None:
                    raise ValueError(f"{a.run} is an average-velocity ({info.objective}) run: sample it without --guidance")
                res = sample_mean(model, noise.to(dev), steps=a.steps, cond=on_dev, grid=grid)
                label = f"{info.objective} (average velocity)"
            elif cal is not None:
                res = sample(model, noise.to(dev), solver=cal, cond=on_dev, guidance=a.guidance)
                label = f"calibrated {cal.kind} ({cal.info.get('initial_solver') or cal.solver})"
            else:
                res = sample(model, noise.to(dev), solver=spec.name, steps=a.steps, grid=grid, cond=on_dev,
                             guidance=a.guidance, path=info.path, callback=progress)
                label = spec.name
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
    title = f"{label}, NFE {res.nfe}" if cal is not None else f"{label}, {a.steps} steps, NFE {res.nfe}"
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
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample a trained run: PNG (grid or scatter) + .npz")
    s.add_argument("run")
    s.add_argument("--n", type=flags.positive_int, default=1000, help="number of samples")
    flags.add_solver(s, grid=False)
    s.add_argument("--grid", default="uniform",
                   help="a grid name (see `straightflow list`), or boss (calibrated for this run, cached)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--label", type=int, default=None, help="class label (default: cycle through classes)")
    s.add_argument("--calibrated", action="store_true",
                   help="sample with the solver `straightflow calibrate` stored beside the run (replaces --solver)")
    s.add_argument("--nfe", type=flags.positive_int, default=None,
                   help="with --calibrated: which stored calibration (default: the only NFE stored)")
    flags.add_seed(s)
    flags.add_device(s)
    flags.add_quiet(s)
    s.add_argument("--out", default="samples.png")
    nf_cli.add_sample_flags(s)
    s.set_defaults(fn=cmd_sample)

    iv = sub.add_parser("invert", help="inversion reconstruction-error report for every deterministic solver")
    iv.add_argument("run")
    iv.add_argument("--solvers", default=None, help="comma-separated solver names (default: all deterministic)")
    iv.add_argument("--nfe", type=flags.ints, default=[4, 8, 16, 32])
    iv.add_argument("--n", type=flags.positive_int, default=256, help="samples generated and inverted")
    flags.add_seed(iv)
    flags.add_device(iv)
    flags.add_quiet(iv)
    iv.add_argument("--out", default=None, help="also write the Markdown table here")
    iv.set_defaults(fn=cmd_invert)

    e = sub.add_parser("eval", help="score a run at several NFE against held-out data, with the floor")
    e.add_argument("run")
    e.add_argument("--nfe", type=flags.ints, default=[1, 2, 4, 8, 100])
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
