"""``straightflow demo``: train a 2D and a digits flow, sample them at NFE 1-100, write plots and a report.

This is ``make demo``'s main job, on embedded data only (no download): what a new user sees first.
"""
from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path

import torch

from .. import metrics, plotting, report
from ..checkpoint import run_info
from ..optimize import calibrate
from ..runs import train_run
from ..solvers import get_solver, initial_noise
from ..system import machine_line
from . import flags

__all__ = ["run_demo", "register", "DEMO_NFES"]


DEMO_NFES = (1, 2, 4, 8, 100)
FEW_STEP_NFE = 4
FEW_STEP_SOLVERS = ("euler", "ab2")  # the sampler everyone starts with; the best uncalibrated one on average


def few_step_section(model, run_dir: Path, ref, out_dir: Path, n: int, seed: int, quick: bool, progress: bool):
    """Euler vs AB2 vs a solver calibrated to this model, all at NFE 4 from the same noise and labels:
    endpoint RMSE to an accurate solve of the same noise, FD with its floor, one picture."""
    nfe, shape, k = FEW_STEP_NFE, tuple(ref.data.x.shape[1:]), getattr(model, "num_classes", None)
    batch = 64 if quick else 128
    if progress:
        print(f"[demo] calibrating a {nfe}-evaluation solver to the digits model (learned table; "
              f"{batch} + {batch} noise samples)", flush=True)
    labels = {"y": torch.arange(batch) % k} if k else None
    xc, _ = initial_noise((batch, *shape), seed=seed + 1000)
    xh, _ = initial_noise((batch, *shape), seed=seed + 1001)
    t0 = time.process_time()
    cal = calibrate(model, "learned", "auto", nfe, xc, holdout=xh, cond=labels, holdout_cond=labels,
                    run_dir=run_dir, mode="ls" if quick else "auto", rtol=1e-4 if quick else 1e-5)
    cal_cpu = time.process_time() - t0
    fine, y, _ = report.sample_like(model, n, shape, seed, "rk4", 25, k)  # NFE 100: the target
    rows, pics = [], []
    for name in (*FEW_STEP_SOLVERS, "calibrated"):
        solver, steps = (cal, None) if name == "calibrated" else (name, report.steps_for(get_solver(name), nfe))
        x, _, used = report.sample_like(model, n, shape, seed, solver, steps, k)
        rep = metrics.evaluate(x, ref.data.x, metric="fd", seed=seed,
                               floor_data=None if ref.floor is None else ref.floor.x)
        rmse = float((x.double() - fine.double()).pow(2).mean().sqrt())
        label = f"calibrated ({cal.info.get('initial_solver')} start)" if name == "calibrated" else name
        rows.append((label, used, rmse, rep.value, rep.floor))
        pics.append((f"{label}, NFE {used}", x[:60]))
    pics.append(("accurate solve (RK4, NFE 100)", fine[:60]))
    plotting.save_image_panels(pics, out_dir / "few-step.png",
                               suptitle=f"digits at NFE {nfe}: same noise and labels in every panel")
    lines = [f"## Few-step sampling: NFE {nfe} on the digits model", "",
             "The same noise and labels through three samplers of equal cost. RMSE: distance to an accurate "
             "solve of the same noise (RK4, NFE 100), what a few-step sampler tries to reach; FD: "
             "classifier Frechet distance to held-out digits (floor: data vs data). The calibrated solver is "
             f"fitted to this model by `straightflow calibrate` ({cal_cpu:.0f} CPU s here, stored in "
             f"`{Path(run_dir).name}/calibrations/`; fitted on other noise than the one scored).", "",
             "| sampler | NFE | RMSE to accurate solve | FD | FD floor |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c:.4f} | {d:.3f} | {e:.3f} |" for a, b, c, d, e in rows]
    lines += ["", f"Calibrated vs Euler: {rows[0][2] / rows[2][2]:.1f}x lower RMSE at the same NFE.", "",
              "![few-step sampling](few-step.png)", ""]
    return lines, {"rows": rows, "calibration_cpu_seconds": cal_cpu}


def run_demo(out: str = "out", quick: bool = False, seed: int = 0, progress: bool = True, device: str = "cpu") -> str:
    """Train a 2D (checkerboard) and a digits flow, sample at NFE 1, 2, 4, 8, 100, write plots + report.

    ``quick``: short runs (about a minute on a 2-core CPU) that still give recognisable digits: 300
    steps of batch 64 at learning rate 2e-3 after a 30-step warm-up, with the trainer's EMA warm-up."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    steps_2d, steps_img = (300, 300) if quick else (6000, 2500)
    img_recipe = {"batch_size": 64, "lr": 2e-3, "warmup": 30} if quick else {"batch_size": 128, "lr": 1e-3, "warmup": 200}
    n_eval = 300 if quick else 4000
    lines = ["# straightflow demo report", "",
             f"Date {date.today().isoformat()}; machine: {machine_line()}; "
             f"{'quick mode (short runs, rough figures)' if quick else 'full demo'}.", "",
             "Every figure is printed beside its data-vs-data floor: the same metric between two disjoint "
             "held-out sets of the same size. A ratio near 1 means the samples are as close to the data "
             "as the data is to itself. Sampling: Euler on a uniform grid, the same noise at every NFE.", ""]

    # -- 2D
    print("[demo] 1/2 training a rectified flow on checkerboard (MLP)", flush=True)
    t0 = time.perf_counter()
    res = train_run("checkerboard", str(out_dir / "run-checkerboard"), steps_2d, n=100_000, hidden=128, batch_size=512,
                    lr=2e-3, warmup=200, lr_schedule="cosine", time_dist="uniform", ema=0.999, seed=seed,
                    ckpt_every=2000, progress=progress, device=device, desc="checkerboard")
    train_2d = time.perf_counter() - t0
    ref = report.run_reference(run_info(res.run_dir), 2 * n_eval)
    rows, samples = report.evaluate_model(res.model, ref.data, DEMO_NFES, n=n_eval, seed=seed, keep_samples=True,
                                          floor_reference=ref.floor)
    plotting.save_scatter_panels([(f"NFE {k}", v) for k, v in samples.items()], out_dir / "checkerboard.png",
                                 reference=ref.data.x[:n_eval], suptitle="checkerboard: rectified flow, Euler")
    lines += [f"## Checkerboard (2D), MLP, {steps_2d} steps ({train_2d:.0f} s)", "", f"Scored against {ref.description}.",
              "", report.rows_to_markdown(rows), "", "![checkerboard](checkerboard.png)", ""]

    # -- digits
    print("[demo] 2/2 training a class-conditional rectified flow on scikit-learn digits (UNet)", flush=True)
    t0 = time.perf_counter()
    res = train_run("digits", str(out_dir / "run-digits"), steps_img, lr_schedule="cosine", ema=0.999, seed=seed,
                    ckpt_every=2000, progress=progress, device=device, desc="digits", **img_recipe)
    train_img = time.perf_counter() - t0
    ref = report.run_reference(run_info(res.run_dir), 0)
    print("[demo] scoring digits with the project's classifier (trained once, then cached)", flush=True)
    rows_i, samples_i = report.evaluate_model(res.model, ref.data, DEMO_NFES, n=n_eval, seed=seed, keep_samples=True,
                                              floor_reference=ref.floor)
    plotting.save_image_panels([(f"NFE {k}", v[:100]) for k, v in samples_i.items()], out_dir / "digits.png",
                               suptitle="digits: class-conditional rectified flow, Euler (same noise and labels in every panel)")
    lines += [f"## Digits (8x8), class-conditional UNet, {steps_img} steps ({train_img:.0f} s)", "",
              f"Scored against {ref.description}.", "", report.rows_to_markdown(rows_i), "", "![digits](digits.png)", ""]
    few, few_summary = few_step_section(res.model, res.run_dir, ref, out_dir, rows_i[0].n, seed, quick, progress)
    lines += few
    total = time.perf_counter() - t_start
    lines += [f"Total demo time: {total:.0f} s.", ""]
    md = "\n".join(lines)
    (out_dir / "report.md").write_text(md)
    summary = {"checkerboard": [r.__dict__ for r in rows], "digits": [r.__dict__ for r in rows_i], "few_step": few_summary,
               "seconds": total, "train_seconds": {"checkerboard": train_2d, "digits": train_img}}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    return md


def cmd_demo(a) -> int:
    md = run_demo(a.out, quick=a.quick, seed=a.seed, progress=not a.quiet, device=str(flags.device(a)))
    print(md)
    print(f"[demo] report: {Path(a.out) / 'report.md'}")
    return 0


def register(sub) -> None:
    d = sub.add_parser("demo", help="train 2D + digits flows, sample at NFE 1-100, write plots and a report")
    d.add_argument("--out", default="out")
    d.add_argument("--quick", action="store_true", help="short runs (about a minute): recognisable digits, rough figures")
    flags.add_seed(d)
    flags.add_device(d)
    flags.add_quiet(d)
    d.set_defaults(fn=cmd_demo)
