"""``straightflow edit`` (class-swap editing) and ``straightflow restore`` (inverse problems).

    straightflow edit RUN --source-class 3 --target-class 8 --n 16 --solver midpoint --steps 20 --inject 4 --out edit.png
    straightflow restore RUN --operator sr2 --method flowchef --noise 0.05 --n 16 --out restore.png
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

import torch

from .. import checkpoint, plotting
from .. import data as sfdata
from ..solvers import available as solver_names
from . import inverse, operators


def _load_run(run: str):
    model = checkpoint.load(run)
    cfg = model.run_config
    if len(cfg["data"]["shape"]) != 3:
        raise ValueError(f"{run}: edit/restore need an image model, this run has data of shape {cfg['data']['shape']}")
    return model, cfg


def _run_images(cfg, n: int, seed: int, label=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (and labels) of the run's data set, optionally of one class, seeded."""
    ds = sfdata.load_dataset(cfg.get("data_source", cfg["data"]["name"]))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    if label is not None:
        if ds.y is None:
            raise ValueError("this run's data set has no labels; class-swap editing needs a labelled data set")
        idx = idx[ds.y[idx] == int(label)]
    if idx.numel() == 0:
        raise ValueError(f"no images of class {label} in {ds.name}")
    idx = idx[:n]
    return ds.x[idx], (None if ds.y is None else ds.y[idx])


def cmd_edit(a) -> int:
    from .editing import class_swap_edit

    model, cfg = _load_run(a.run)
    k = getattr(model, "num_classes", None)
    if not k:
        raise ValueError("edit needs a class-conditional run (trained with labels)")
    for name, c in (("--source-class", a.source_class), ("--target-class", a.target_class)):
        if not 0 <= c < k:
            raise ValueError(f"{name} must be in [0, {k}), got {c}")
    x, _ = _run_images(cfg, a.n, a.seed, label=a.source_class)
    res = class_swap_edit(model, x, a.source_class, a.target_class, solver=a.solver, steps=a.steps, inject=a.inject,
                          guidance=a.guidance, gamma=a.gamma, eta=a.eta, eta_window=(0.0, a.eta_stop), seed=a.seed)
    dist = (res.x - x).pow(2).flatten(1).mean(1).sqrt().mean().item()
    msg = ""
    try:
        from ..metrics import feature_extractor

        clf = feature_extractor("digits" if x.shape[-1] == 8 else "mnist")
        with torch.no_grad():
            acc = (clf(res.x.float()).argmax(1) == a.target_class).float().mean().item()
        msg = f", classified as the target class: {100 * acc:.0f}%"
    except Exception as e:  # the classifier is a convenience; the edit itself succeeded
        msg = f" (target-class accuracy unavailable: {e})"
    out = Path(a.out)
    plotting.save_image_panels([(f"source (class {a.source_class})", x), (f"edited -> {a.target_class}, inject {a.inject}", res.x)],
                               out, nrow=min(8, a.n),
                               suptitle=f"{res.info['solver']}, {a.steps} steps, NFE {res.nfe} "
                                        f"(inversion {res.nfe_inversion} + generation {res.nfe_generation})")
    print(f"edited {x.shape[0]} images {a.source_class} -> {a.target_class}: NFE {res.nfe} "
          f"(inversion {res.nfe_inversion} + generation {res.nfe_generation}), RMS change {dist:.3f}{msg}; {out}")
    return 0


def cmd_restore(a) -> int:
    from ..metrics import psnr, ssim

    model, cfg = _load_run(a.run)
    shape = tuple(cfg["data"]["shape"])
    op = operators.make_operator(a.operator, shape)
    x, _ = _run_images(cfg, a.n, a.seed)
    y = op.measure(x, a.noise, torch.Generator().manual_seed(a.seed + 1))
    if a.method == "pmrf":
        pm_steps, flow_steps = a.pmrf_steps
        ds = sfdata.load_dataset(cfg.get("data_source", cfg["data"]["name"]))
        cache = Path(a.run) / "pmrf" / f"{op.name}-noise{a.noise:g}"
        print(f"training PMRF ({pm_steps} + {flow_steps} steps; cached in {cache})", flush=True)
        net = inverse.PMRF(op, sigma_y=a.noise).fit(ds.x, pm_steps=pm_steps, flow_steps=flow_steps,
                                                    seed=a.seed, progress=not a.quiet, out=str(cache))
        res = inverse.restore("pmrf", net, op, y, memory=not a.no_memory, steps=a.steps, seed=a.seed)
    else:
        kw = {"steps": a.steps, "seed": a.seed}
        if a.method in ("flowchef", "dps"):
            kw["step_size"] = a.step_size if a.step_size is not None else 1.0
        elif a.method == "flair":
            kw["sigma_y"] = a.noise
        res = inverse.restore(a.method, model, op, y, memory=not a.no_memory, **kw)
    xr = res.x.clamp(-1, 1)
    p, s = psnr(xr, x), ssim(xr, x)
    seen = op.pinv(y).clamp(-1, 1)
    out = Path(a.out)
    plotting.save_image_panels([("original", x), (f"measurement ({op.name}, A^+ y)", seen), (f"{a.method}", xr)], out,
                               nrow=min(8, a.n), suptitle=f"{a.method} on {op.name}, noise {a.noise:g}: "
                                                          f"PSNR {p:.2f} dB, SSIM {s:.3f}, NFE {res.nfe}")
    mem = "n/a" if res.peak_bytes is None else f"{res.peak_bytes / 2**20:.1f} MiB"
    print(f"{a.method} on {op.name} (noise {a.noise:g}, {x.shape[0]} images): PSNR {p:.2f} dB, SSIM {s:.3f}, "
          f"NFE {res.nfe}, {res.seconds:.2f} s, peak memory {mem}; {out}")
    return 0


def _pair(s: str) -> Tuple[int, int]:
    try:
        a, b = (int(v) for v in s.split(","))
        return a, b
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers (predictor,flow), got {s!r}")


def register(sub) -> None:
    e = sub.add_parser("edit", help="class-swap editing of a class-conditional image run (before/after grid)")
    e.add_argument("run")
    e.add_argument("--source-class", type=int, required=True)
    e.add_argument("--target-class", type=int, required=True)
    e.add_argument("--n", type=int, default=16)
    e.add_argument("--solver", default="midpoint", help=f"a deterministic solver: {', '.join(solver_names())}")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--inject", type=int, default=0,
                   help="regeneration steps shared with the source trajectory (0 = full inversion; more = more structure kept)")
    e.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale for the target class")
    e.add_argument("--gamma", type=float, default=0.0, help="RF-Inversion controller strength in the inversion")
    e.add_argument("--eta", type=float, default=0.0, help="RF-Inversion controller strength towards the source image")
    e.add_argument("--eta-stop", type=float, default=0.25, help="eta acts for t in [0, eta_stop]")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="edit.png")
    e.set_defaults(fn=cmd_edit)

    r = sub.add_parser("restore", help="solve an inverse problem on a run's images (grid + PSNR/SSIM)")
    r.add_argument("run")
    r.add_argument("--operator", default="inpaint_box", help=f"one of: {', '.join(operators.available())}")
    r.add_argument("--method", default="flowchef", choices=list(inverse.METHODS))
    r.add_argument("--noise", type=float, default=0.05, help="measurement noise sigma_y")
    r.add_argument("--n", type=int, default=16)
    r.add_argument("--steps", type=int, default=50, help="sampling steps (PMRF: flow steps)")
    r.add_argument("--step-size", type=float, default=None, help="flowchef/dps step size (units of 1/||A||^2 for flowchef)")
    r.add_argument("--pmrf-steps", type=_pair, default=(300, 600), help="PMRF training steps: predictor,flow")
    r.add_argument("--no-memory", action="store_true", help="skip the (second, profiled) peak-memory run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--out", default="restore.png")
    r.set_defaults(fn=cmd_restore)

    try:  # inference-time search (built alongside)
        from .search_cli import register as r2
    except ModuleNotFoundError:
        return
    r2(sub)
