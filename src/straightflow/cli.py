"""The ``straightflow`` command: train, sample, eval, demo, bench, list.

Every choice (data set, model, path, time distribution, loss, coupling, solver, grid, metric)
is read from the same registries the library uses, so ``--help`` and the error messages list
exactly the names that work.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from . import checkpoint, coupling, data as sfdata, grids, losses, metrics, models, paths, plotting, report
from . import time as sftime
from .flow import Flow
from .registry import UnknownNameError
from .solvers import available as solver_names
from .solvers import get_solver


def _ints(s: str) -> List[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


# ----------------------------------------------------------------------------- train
def default_model_config(x_shape, num_classes: Optional[int], args) -> dict:
    if len(x_shape) == 1:
        return {"name": "mlp", "dim": int(x_shape[0]), "hidden": args.hidden, "depth": args.depth,
                "num_classes": num_classes}
    if len(x_shape) == 3:
        c, h, w = x_shape
        if h != w:
            raise SystemExit(f"error: the UNet needs square images, got {h}x{w}")
        mults = [1, 2] if h % 2 == 0 else [1]
        if h >= 28 and h % 4 == 0:
            mults = [1, 2, 2]
        return {"name": "unet", "in_channels": int(c), "resolution": int(h), "base_channels": args.base_channels,
                "channel_mults": mults, "num_classes": num_classes}
    raise SystemExit(f"error: no default model for data of shape {tuple(x_shape)}; vectors (D,) or images (C, H, W)")


def train_run(data_spec: str, out: str, steps: int, *, n: Optional[int] = None, model: str = "auto",
              hidden: int = 256, depth: int = 4, base_channels: int = 32, conditional: bool = True,
              path: str = "linear", time_dist: str = "uniform", loss: str = "mse", coupling_name: str = "independent",
              cond_dropout: Optional[float] = None, batch_size: int = 256, lr: float = 1e-3, warmup: int = 100,
              lr_schedule: str = "constant", ema: float = 0.999, grad_clip: float = 1.0, ckpt_every: int = 1000,
              seed: int = 0, device: str = "cpu", progress: bool = True):
    """Train a flow on a named data set or a file and write a run directory (used by the CLI and demo)."""
    from .train import train

    ds = sfdata.load_dataset(data_spec, n=n, seed=seed)
    num_classes = ds.num_classes if (conditional and ds.y is not None) else None
    args = argparse.Namespace(hidden=hidden, depth=depth, base_channels=base_channels)
    cfg = default_model_config(ds.shape, num_classes, args)
    if model != "auto" and model != cfg["name"]:
        models.MODELS.canonical(model)
        raise SystemExit(f"error: model {model!r} does not fit data of shape {tuple(ds.shape)}; use 'auto'")
    net = models.build_model(cfg)
    if cond_dropout is None:
        cond_dropout = 0.1 if num_classes else 0.0
    if not num_classes:
        ds = sfdata.Dataset(ds.x, name=ds.name)
    flow = Flow(net, path=path, time_dist=time_dist, loss=loss, coupling=coupling_name, cond_dropout=cond_dropout)
    return train(flow, ds, steps=steps, out=out, batch_size=batch_size, lr=lr, warmup=warmup, lr_schedule=lr_schedule,
                 ema_decay=ema, grad_clip=grad_clip, ckpt_every=ckpt_every, seed=seed, device=device,
                 progress=progress, extra_config={"data_source": data_spec})


def cmd_train(a) -> int:
    res = train_run(a.data, a.out, a.steps, n=a.n, model=a.model, hidden=a.hidden, depth=a.depth,
                    base_channels=a.base_channels, conditional=not a.unconditional, path=a.path,
                    time_dist=a.time_dist, loss=a.loss, coupling_name=a.coupling, cond_dropout=a.cond_dropout,
                    batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, lr_schedule=a.lr_schedule, ema=a.ema,
                    grad_clip=a.grad_clip, ckpt_every=a.ckpt_every, seed=a.seed, device=a.device,
                    progress=not a.quiet)
    print(f"trained {res.steps} steps, final loss {res.final_loss:.4f}; run written to {res.run_dir}")
    return 0


# ----------------------------------------------------------------------------- sample
def _load(run: str):
    model = checkpoint.load(run)
    return model, model.run_config


def cmd_sample(a) -> int:
    model, cfg = _load(a.run)
    spec = get_solver(a.solver)
    shape = tuple(cfg["data"]["shape"])
    n = a.n
    g = torch.Generator().manual_seed(a.seed)
    noise = torch.randn((n, *shape), generator=g)
    cond = None
    if getattr(model, "num_classes", None):
        if a.label is not None:
            if not 0 <= a.label < model.num_classes:
                raise SystemExit(f"error: --label must be in [0, {model.num_classes}), got {a.label}")
            y = torch.full((n,), a.label, dtype=torch.long)
        else:
            y = torch.arange(n) % model.num_classes
        cond = {"y": y}
    elif a.guidance is not None or a.label is not None:
        raise SystemExit("error: --label/--guidance need a class-conditional model")
    from .solvers import sample

    grid = a.grid
    if grid == "boss":  # Bellman-optimal grid for this solver and NFE, calibrated once and kept beside the model
        from .optimize import calibrated_grid

        grid = calibrated_grid(a.run, spec.name, spec.nfe(a.steps))
    with torch.no_grad():
        res = sample(model, noise, solver=spec.name, steps=a.steps, grid=grid, cond=cond, guidance=a.guidance,
                     path=cfg.get("flow", {}).get("path", "linear"))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": res.x.numpy(), "noise": noise.numpy()}
    if cond:
        arrays["y"] = cond["y"].numpy()
    np.savez(out.with_suffix(".npz"), **arrays)
    title = f"{spec.name}, {a.steps} steps, NFE {res.nfe}"
    if res.x.ndim == 4:
        plotting.save_image_panels([(title, res.x[:100])], out)
    else:
        ref = report.reference_data(cfg.get("data_source", cfg["data"]["name"]), n)
        plotting.save_scatter_panels([(title, res.x[:, :2])], out, reference=ref.x[:, :2])
    print(f"{n} samples, NFE {res.nfe}: {out} and {out.with_suffix('.npz')}")
    return 0


# ----------------------------------------------------------------------------- invert
def cmd_invert(a) -> int:
    model, cfg = _load(a.run)
    shape = tuple(cfg["data"]["shape"])
    g = torch.Generator().manual_seed(a.seed)
    x0 = torch.randn((a.n, *shape), generator=g)
    cond = {"y": torch.arange(a.n) % model.num_classes} if getattr(model, "num_classes", None) else None
    solvers = a.solvers.split(",") if a.solvers else [n for n in solver_names()
                                                      if not get_solver(n).stochastic and n != "dopri5"]
    rows = report.inversion_report(model, x0, solvers, a.nfe, cond=cond,
                                   path=cfg.get("flow", {}).get("path", "linear"))
    md = (f"# Inversion of `{a.run}`\n\n{a.n} samples generated by RK4 (200 steps) from known noise, inverted "
          f"and regenerated with each solver; {machine_line()}\n\n" + report.inversion_markdown(rows))
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    return 0


# ----------------------------------------------------------------------------- eval
def cmd_eval(a) -> int:
    model, cfg = _load(a.run)
    source = cfg.get("data_source", cfg["data"]["name"])
    ref = report.reference_data(source, max(2 * a.n, 4))
    rows, _ = report.evaluate_model(model, ref, a.nfe, solver=a.solver, n=a.n, seed=a.seed, metric=a.metric,
                                    grid=a.grid, extractor=a.extractor, path=cfg.get("flow", {}).get("path", "linear"))
    md = f"# Evaluation of `{a.run}`\n\nData: {source}; {a.n} samples; {machine_line()}\n\n" + report.rows_to_markdown(rows)
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    return 0


# ----------------------------------------------------------------------------- demo
DEMO_NFES = (1, 2, 4, 8, 100)


def run_demo(out: str = "out", quick: bool = False, seed: int = 0, progress: bool = True) -> str:
    """Train a 2D (checkerboard) and a digits flow, sample at NFE 1, 2, 4, 8, 100, write plots + report."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    steps_2d, steps_img = (150, 40) if quick else (6000, 2500)
    n_eval = 300 if quick else 4000
    lines = [f"# straightflow demo report", "",
             f"Date {date.today().isoformat()}; machine: {machine_line()}; "
             f"{'quick mode (tiny runs, numbers not meaningful)' if quick else 'full demo'}.", "",
             "Every figure is printed beside its data-vs-data floor: the same metric between two disjoint "
             "held-out sets of the same size. A ratio near 1 means the samples are as close to the data "
             "as the data is to itself. Sampling: Euler on a uniform grid, the same noise at every NFE.", ""]

    # -- 2D
    print("[demo] 1/2 training a rectified flow on checkerboard (MLP)", flush=True)
    t0 = time.perf_counter()
    res = train_run("checkerboard", str(out_dir / "run-checkerboard"), steps_2d, n=100_000, hidden=128, batch_size=512,
                    lr=2e-3, warmup=200, lr_schedule="cosine", time_dist="uniform", ema=0.999, seed=seed,
                    ckpt_every=2000, progress=progress)
    train_2d = time.perf_counter() - t0
    ref = report.reference_data("checkerboard", 2 * n_eval)
    rows, samples = report.evaluate_model(res.model, ref, DEMO_NFES, n=n_eval, seed=seed, keep_samples=True)
    plotting.save_scatter_panels([(f"NFE {k}", v) for k, v in samples.items()], out_dir / "checkerboard.png",
                                 reference=ref.x[:n_eval], suptitle="checkerboard: rectified flow, Euler")
    lines += [f"## Checkerboard (2D), MLP, {steps_2d} steps ({train_2d:.0f} s)", "",
              report.rows_to_markdown(rows), "", "![checkerboard](checkerboard.png)", ""]

    # -- digits
    print("[demo] 2/2 training a class-conditional rectified flow on scikit-learn digits (UNet)", flush=True)
    t0 = time.perf_counter()
    res = train_run("digits", str(out_dir / "run-digits"), steps_img, batch_size=128, lr=1e-3, warmup=200,
                    lr_schedule="cosine", ema=0.999, seed=seed, ckpt_every=2000, progress=progress)
    train_img = time.perf_counter() - t0
    ref = report.reference_data("digits", 0)
    n_img = min(n_eval, len(ref) // 2)
    print("[demo] scoring digits with the project's classifier (trained once, then cached)", flush=True)
    rows_i, samples_i = report.evaluate_model(res.model, ref, DEMO_NFES, n=n_img, seed=seed, keep_samples=True)
    plotting.save_image_panels([(f"NFE {k}", v[:100]) for k, v in samples_i.items()], out_dir / "digits.png",
                               suptitle="digits: class-conditional rectified flow, Euler (same noise and labels in every panel)")
    lines += [f"## Digits (8x8), class-conditional UNet, {steps_img} steps ({train_img:.0f} s)", "",
              report.rows_to_markdown(rows_i), "", "![digits](digits.png)", ""]
    total = time.perf_counter() - t_start
    lines += [f"Total demo time: {total:.0f} s.", ""]
    md = "\n".join(lines)
    (out_dir / "report.md").write_text(md)
    summary = {"checkerboard": [r.__dict__ for r in rows], "digits": [r.__dict__ for r in rows_i],
               "seconds": total, "train_seconds": {"checkerboard": train_2d, "digits": train_img}}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    return md


def cmd_demo(a) -> int:
    md = run_demo(a.out, quick=a.quick, seed=a.seed, progress=not a.quiet)
    print(md)
    print(f"[demo] report: {Path(a.out) / 'report.md'}")
    return 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(a) -> int:
    if a.suite == "train":
        from .bench.train import bench_train

        md = bench_train(a.out, steps=a.steps, repeats=a.repeats, threads=a.threads)
        print(md)
        return 0
    if a.suite == "solvers":
        from .bench.solvers import main as bench_solvers_main

        argv = ["--out", a.out, "--threads", str(a.threads)]
        argv += ["--fields", a.fields] if a.fields else []
        argv += ["--run-2d", a.run_2d] if a.run_2d else []
        argv += ["--run-digits", a.run_digits] if a.run_digits else []
        argv += ["--quick"] if a.quick else []
        return bench_solvers_main(argv)
    if a.suite in BENCH_SUITES:
        import importlib

        mod = importlib.import_module(f"straightflow.bench.{a.suite}")
        argv = ["--out", a.out, "--threads", str(a.threads)] + (["--quick"] if a.quick else []) + list(a.extra)
        return int(mod.main(argv) or 0)
    raise SystemExit(f"error: unknown bench suite {a.suite!r}; valid: {', '.join(['train', 'solvers', *BENCH_SUITES])}")


# Suites living in straightflow/bench/<name>.py with a ``main(argv) -> int`` taking --out, --threads,
# --quick and their own options (passed through from the command line).
BENCH_SUITES = ("straighten", "control", "stream", "images", "align")

# Sub-packages that add their own commands: each has a ``cli.py`` with ``register(subparsers)``
# adding subcommands whose ``fn(args) -> int`` is set with ``set_defaults(fn=...)``.
PLUGINS = ("straighten", "control", "stream", "images", "align")


def _register_plugins(sub) -> None:
    import importlib

    for name in PLUGINS:
        try:
            mod = importlib.import_module(f"straightflow.{name}.cli")
        except ModuleNotFoundError as e:
            if e.name in (f"straightflow.{name}", f"straightflow.{name}.cli"):
                continue  # that part of the library is not built yet
            raise
        mod.register(sub)


# ----------------------------------------------------------------------------- list
def cmd_list(a) -> int:
    families = {
        "data sets": sfdata.available(), "models": models.available(), "paths": paths.available(),
        "time distributions": sftime.available(), "losses": losses.available(), "couplings": coupling.available(),
        "solvers": solver_names(), "grids": grids.available(), "metrics": metrics.available(),
    }
    for k, v in families.items():
        print(f"{k}: {', '.join(v)}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="straightflow", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a flow on a data set or a file")
    t.add_argument("--data", default="checkerboard",
                   help=f"a data set name ({', '.join(sfdata.available())}) or a .npz/.npy/IDX file or image folder")
    t.add_argument("--out", required=True, help="run directory (resumes if it holds a training state)")
    t.add_argument("--steps", type=int, default=5000)
    t.add_argument("--n", type=int, default=None, help="number of points for the 2D toys / subset size")
    t.add_argument("--model", default="auto", help=f"auto (MLP for vectors, UNet for images) or {', '.join(models.available())}")
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--depth", type=int, default=4)
    t.add_argument("--base-channels", type=int, default=32)
    t.add_argument("--unconditional", action="store_true", help="ignore labels even if the data has them")
    t.add_argument("--path", default="linear", help=f"one of: {', '.join(paths.available())}")
    t.add_argument("--time-dist", default="uniform", help=f"one of: {', '.join(sftime.available())}")
    t.add_argument("--loss", default="mse", help=f"one of: {', '.join(losses.available())}")
    t.add_argument("--coupling", default="independent", help=f"one of: {', '.join(coupling.available())}")
    t.add_argument("--cond-dropout", type=float, default=None, help="label drop rate for CFG (default 0.1 if labelled)")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--ckpt-every", type=int, default=1000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample a trained run: PNG (grid or scatter) + .npz")
    s.add_argument("run")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--solver", default="euler", help=f"one of: {', '.join(solver_names())}")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--grid", default="uniform",
                   help=f"one of: {', '.join(grids.available())}, or boss (calibrated for this run, cached)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--label", type=int, default=None, help="class label (default: cycle through classes)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(fn=cmd_sample)

    iv = sub.add_parser("invert", help="inversion reconstruction-error report for every deterministic solver")
    iv.add_argument("run")
    iv.add_argument("--solvers", default=None, help="comma-separated solver names (default: all deterministic)")
    iv.add_argument("--nfe", type=_ints, default=[4, 8, 16, 32])
    iv.add_argument("--n", type=int, default=256)
    iv.add_argument("--seed", type=int, default=0)
    iv.add_argument("--out", default=None, help="also write the Markdown table here")
    iv.set_defaults(fn=cmd_invert)

    e = sub.add_parser("eval", help="score a run at several NFE against held-out data, with the floor")
    e.add_argument("run")
    e.add_argument("--nfe", type=_ints, default=list(DEMO_NFES))
    e.add_argument("--solver", default="euler", help=f"one of: {', '.join(solver_names())}")
    e.add_argument("--grid", default="uniform", help=f"one of: {', '.join(grids.available())}")
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--metric", default=None, help=f"default w2 (vectors) / fd (images); one of {', '.join(metrics.available('distribution'))}")
    e.add_argument("--extractor", default="digits", help="classifier for fd: digits or mnist")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="also write the Markdown table here")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="train 2D + digits flows, sample at NFE 1-100, write plots and a report")
    d.add_argument("--out", default="out")
    d.add_argument("--quick", action="store_true", help="tiny runs (seconds) to check the pipeline")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="benchmark suites that write Markdown tables and plots")
    b.add_argument("suite", help="train (trainer overhead vs peers), solvers (error vs NFE vs peers), "
                   "straighten, control, stream or images")
    b.add_argument("--out", default="bench_out")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--steps", type=int, default=300, help="train: steps per timed run")
    b.add_argument("--repeats", type=int, default=5, help="train: timed repeats (median)")
    b.add_argument("--fields", default=None, help="solvers: oracle2d,oracle64d,checkerboard,digits")
    b.add_argument("--run-2d", default=None, help="solvers: a trained 2D run directory (else one is trained)")
    b.add_argument("--run-digits", default=None, help="solvers: a trained digits run directory")
    b.add_argument("--quick", action="store_true", help="tiny settings (seconds to minutes) to check the pipeline")

    b.set_defaults(fn=cmd_bench)

    _register_plugins(sub)

    li = sub.add_parser("list", help="list every registered name (data, models, paths, solvers, ...)")
    li.set_defaults(fn=cmd_list)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra and not (a.cmd == "bench" and a.suite in BENCH_SUITES):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    a.extra = extra  # suite-specific options for `bench straighten|control|stream|images`
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return a.fn(a)
    except (UnknownNameError, checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
