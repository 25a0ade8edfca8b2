"""``straightflow edit | restore | search``: control a trained run without retraining.

    straightflow edit RUN --source-class 3 --target-class 8 --n 16 --solver midpoint --steps 20 --inject 4 --out edit.png
    straightflow restore RUN --operator sr2 --method flowchef --noise 0.05 --n 16 --out restore.png
    straightflow search RUN --reward class:3 --method rbf --budget 100 --n 16 --out search.png [--vp]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from .. import plotting
from ..control import inverse, operators
from ..control.editing import class_swap_edit
from ..control.rewards import parse_reward
from ..control.scaling import available as search_methods, diversity, hit_rate, search
from ..metrics import classifier_features, feature_extractor, psnr, ssim
from ..oracle import GaussianMixtureFlow
from . import flags

SEARCH_DOC = """Inference-time scaling of a trained run against a reward, at a fixed NFE budget.

RUN is a run directory (or ``oracle:8gaussians`` for the exact 2D eight-Gaussians field). A
class-conditional model samples with the null label (unconditional) unless --label is given.
Writes a sample grid (images) or scatter plot (2D) and <out>.npz; prints the mean reward, the
hit rate, the diversity and the NFE used per output."""


def _load_image_run(run: str, device="cpu"):
    model, info = flags.load_run(run, device=device)
    if len(info.shape) != 3:
        raise ValueError(f"{run}: edit/restore need an image model, this run has data of shape {list(info.shape)}")
    return model, info


def _run_images(info, n: int, seed: int, label=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (and labels) of the run's data set, optionally of one class, seeded: from its
    held-out part when the run was trained on the training split (never images it was trained on)."""
    ds = info.load_data("test" if info.data_split == "train" else "all")
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
    dev = flags.device(a)
    model, info = _load_image_run(a.run, dev)
    k = getattr(model, "num_classes", None)
    if not k:
        raise ValueError("edit needs a class-conditional run (trained with labels)")
    for name, c in (("--source-class", a.source_class), ("--target-class", a.target_class)):
        if not 0 <= c < k:
            raise ValueError(f"{name} must be in [0, {k}), got {c}")
    x, _ = _run_images(info, a.n, a.seed, label=a.source_class)
    res = class_swap_edit(model, x.to(dev), a.source_class, a.target_class, solver=a.solver, steps=a.steps,
                          inject=a.inject, guidance=a.guidance, gamma=a.gamma, eta=a.eta, eta_window=(0.0, a.eta_stop),
                          seed=a.seed)
    res.x = res.x.cpu()
    dist = (res.x - x).pow(2).flatten(1).mean(1).sqrt().mean().item()
    msg = ""
    try:
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
    dev = flags.device(a)
    model, info = _load_image_run(a.run, dev)
    op = operators.make_operator(a.operator, info.shape)
    x, _ = _run_images(info, a.n, a.seed)
    y = op.measure(x, a.noise, torch.Generator().manual_seed(a.seed + 1)).to(dev)
    if a.method == "pmrf":
        pm_steps, flow_steps = a.pmrf_steps
        ds = info.load_data("train" if info.data_split == "train" else "all")
        cache = Path(a.run) / "pmrf" / f"{op.name}-noise{a.noise:g}"
        print(f"training PMRF ({pm_steps} + {flow_steps} steps; cached in {cache})", flush=True)
        net = inverse.PMRF(op, sigma_y=a.noise).fit(ds.x, pm_steps=pm_steps, flow_steps=flow_steps,
                                                    seed=a.seed, progress=not a.quiet, out=str(cache),
                                                    device=str(dev))
        res = inverse.restore("pmrf", net, op, y, memory=not a.no_memory, steps=a.steps, seed=a.seed)
    else:
        kw = {"steps": a.steps, "seed": a.seed}
        if a.method in ("flowchef", "dps"):
            kw["step_size"] = a.step_size
        elif a.method == "flair":
            kw["sigma_y"] = a.noise
        res = inverse.restore(a.method, model, op, y, memory=not a.no_memory, **kw)
    xr = res.x.clamp(-1, 1).cpu()
    p, s = psnr(xr, x), ssim(xr, x)
    seen = op.pinv(y).clamp(-1, 1).cpu()
    out = Path(a.out)
    plotting.save_image_panels([("original", x), (f"measurement ({op.name}, A^+ y)", seen), (f"{a.method}", xr)], out,
                               nrow=min(8, a.n), suptitle=f"{a.method} on {op.name}, noise {a.noise:g}: "
                                                          f"PSNR {p:.2f} dB, SSIM {s:.3f}, NFE {res.nfe}")
    mem = "n/a" if res.peak_bytes is None else f"{res.peak_bytes / 2**20:.1f} MiB"
    print(f"{a.method} on {op.name} (noise {a.noise:g}, {x.shape[0]} images): PSNR {p:.2f} dB, SSIM {s:.3f}, "
          f"NFE {res.nfe}, {res.seconds:.2f} s, peak memory {mem}; {out}")
    return 0


ORACLES = ("8gaussians",)


class _OnDevice(torch.nn.Module):
    """The velocity of a model held on ``device`` for an algorithm whose state stays on the CPU (the
    search methods): inputs go to the device, the velocity comes back."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner, self.device = model, device
        for k in ("num_classes", "null_class", "sample_shape", "config", "run_config"):
            if hasattr(model, k):
                setattr(self, k, getattr(model, k))

    def forward(self, x, t, **cond):
        on = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in cond.items()}
        return self.inner(x.to(self.device), t.to(self.device), **on).to(x.device)


def load_model(run: str, device="cpu"):
    """``(model, sample shape, path name)`` from a run directory or ``oracle:8gaussians``."""
    if run.startswith("oracle:"):
        name = run.split(":", 1)[1]
        if name not in ORACLES:
            raise ValueError(f"unknown oracle {name!r}; valid: {', '.join(ORACLES)}")
        return GaussianMixtureFlow.eight_gaussians(), (2,), "linear"
    if not Path(run).is_dir():
        raise ValueError(f"run {run!r} is not a run directory (or 'oracle:8gaussians')")
    dev = torch.device(device)
    model, info = flags.load_run(run, device=dev)
    return (model if dev.type == "cpu" else _OnDevice(model, dev)), info.shape, info.path


def cmd_search(a) -> int:
    model, shape, path = load_model(a.run, flags.device(a))
    reward = parse_reward(a.reward)
    cond = None
    k = getattr(model, "num_classes", None)
    if k:
        if a.label is not None and not 0 <= a.label < k:
            raise ValueError(f"--label must be in [0, {k}), got {a.label}")
        lab = model.null_class if a.label is None else a.label
        cond = {"y": torch.full((a.n,), int(lab), dtype=torch.long)}
    elif a.label is not None:
        raise ValueError("--label needs a class-conditional model")
    kw = {"vp": a.vp, "seed": a.seed, "path": path, "cond": cond}
    if a.steps is not None:
        kw["steps"] = a.steps
    if a.method != "best_of_n":
        kw["scale"] = a.scale
    res = search(model, reward, shape, a.budget, a.method, n=a.n, **kw)
    x = res.x.detach().float()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out.with_suffix(".npz"), x=x.numpy(), rewards=res.rewards.numpy())
    title = f"{a.method}{' +VP' if a.vp else ''}, budget {a.budget}, NFE {res.nfe}"
    if x.ndim == 4:
        plotting.save_image_panels([(title, x[:100])], out)
    else:
        lim = max(4.5, float(x[:, :2].abs().max()) + 0.5)
        plotting.save_scatter_panels([(title, x[:, :2])], out, lim=lim)
    hit = hit_rate(reward, res.x)
    feats = None
    if x.ndim == 4:
        feats = classifier_features
    print(f"{a.method}{' (VP)' if a.vp else ''}: reward {reward.name} mean {float(res.rewards.mean()):.4f} "
          f"(min {float(res.rewards.min()):.4f}, max {float(res.rewards.max()):.4f})"
          + (f", hit rate {hit:.3f}" if hit is not None else "")
          + f", diversity {diversity(x, feats):.3f}; NFE used {res.nfe} of budget {res.budget} per output, "
          f"{a.n} outputs: {out} and {out.with_suffix('.npz')}")
    return 0


def register(sub) -> None:
    """``edit``, ``restore`` and ``search``."""
    e = sub.add_parser("edit", help="class-swap editing of a class-conditional image run (before/after grid)")
    e.add_argument("run")
    e.add_argument("--source-class", type=int, required=True)
    e.add_argument("--target-class", type=int, required=True)
    e.add_argument("--n", type=int, default=16)
    flags.add_solver(e, solver="midpoint", steps=20, grid=False)
    e.add_argument("--inject", type=int, default=0,
                   help="regeneration steps shared with the source trajectory (0 = full inversion; more = more structure kept)")
    e.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale for the target class")
    e.add_argument("--gamma", type=float, default=0.0, help="RF-Inversion controller strength in the inversion")
    e.add_argument("--eta", type=float, default=0.0, help="RF-Inversion controller strength towards the source image")
    e.add_argument("--eta-stop", type=float, default=0.25, help="eta acts for t in [0, eta_stop]")
    flags.add_seed(e)
    flags.add_device(e)
    e.add_argument("--out", default="edit.png")
    e.set_defaults(fn=cmd_edit)

    r = sub.add_parser("restore", help="solve an inverse problem on a run's images (grid + PSNR/SSIM)")
    r.add_argument("run")
    r.add_argument("--operator", default="inpaint_box", help=f"one of: {', '.join(operators.available())}")
    r.add_argument("--method", default="flowchef", choices=inverse.available(), help="inverse-problem method")
    r.add_argument("--noise", type=float, default=0.05, help="measurement noise sigma_y")
    r.add_argument("--n", type=int, default=16)
    r.add_argument("--steps", type=int, default=50, help="sampling steps (PMRF: flow steps)")
    r.add_argument("--step-size", type=float, default=1.0,
                   help="flowchef/dps step size (units of 1/||A||^2 for flowchef)")
    r.add_argument("--pmrf-steps", type=flags.int_pair, default=(300, 600), help="PMRF training steps: predictor,flow")
    r.add_argument("--no-memory", action="store_true", help="skip the (second, profiled) peak-memory run")
    flags.add_seed(r)
    flags.add_device(r)
    flags.add_quiet(r)
    r.add_argument("--out", default="restore.png")
    r.set_defaults(fn=cmd_restore)

    p = sub.add_parser("search", help="inference-time scaling: best-of-N / SMC / RBF against a reward at an NFE budget",
                       description=SEARCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, or oracle:8gaussians")
    p.add_argument("--reward", required=True,
                   help="class:C | region:disc:cx,cy,r | region:halfplane:nx,ny,b (region options :hard, :soft=T)")
    p.add_argument("--method", default="rbf", choices=search_methods(), help="search method (default rbf)")
    p.add_argument("--budget", type=int, default=100, help="velocity evaluations per output (default 100)")
    p.add_argument("--n", type=int, default=16, help="number of outputs (default 16)")
    p.add_argument("--steps", type=int, default=None, help="time steps (default 10 or the budget if smaller)")
    p.add_argument("--scale", type=float, default=3.0, help="SDE diffusion scale c in g = c sigma(t) (default 3)")
    p.add_argument("--vp", action="store_true", help="sample the VP interpolant converted from the model's path")
    p.add_argument("--label", type=int, default=None, help="class label for a conditional model (default: null)")
    flags.add_seed(p)
    flags.add_device(p)
    p.add_argument("--out", default="search.png", help="output image (plus .npz)")
    p.set_defaults(fn=cmd_search)
