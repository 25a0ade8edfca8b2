"""``straightflow search``: inference-time scaling of a trained run against a reward, at a fixed NFE budget.

    straightflow search RUN --reward class:3 --method rbf --budget 100 --n 16 --out search.png [--vp]

``RUN`` is a run directory (or ``oracle:8gaussians`` for the exact 2D eight-Gaussians field). A
class-conditional model samples with the null label (unconditional) unless ``--label`` is given.
Writes a sample grid (images) or scatter plot (2D) and ``<out>.npz``; prints the mean reward,
the hit rate, the diversity and the NFE used per output.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .rewards import parse_reward
from .scaling import METHODS, diversity, hit_rate, search

__all__ = ["register", "cmd_search", "load_model"]

ORACLES = ("8gaussians",)


def load_model(run: str):
    """``(model, sample shape, path name)`` from a run directory or ``oracle:8gaussians``."""
    if run.startswith("oracle:"):
        name = run.split(":", 1)[1]
        if name not in ORACLES:
            raise ValueError(f"unknown oracle {name!r}; valid: {', '.join(ORACLES)}")
        from ..oracle import GaussianMixtureFlow

        return GaussianMixtureFlow.eight_gaussians(), (2,), "linear"
    if not Path(run).is_dir():
        raise ValueError(f"run {run!r} is not a run directory (or 'oracle:8gaussians')")
    from ..checkpoint import load

    model = load(run)
    cfg = model.run_config
    return model, tuple(cfg["data"]["shape"]), cfg.get("flow", {}).get("path", "linear")


def cmd_search(a) -> int:
    model, shape, path = load_model(a.run)
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
    from .. import plotting

    if x.ndim == 4:
        plotting.save_image_panels([(title, x[:100])], out)
    else:
        lim = max(4.5, float(x[:, :2].abs().max()) + 0.5)
        plotting.save_scatter_panels([(title, x[:, :2])], out, lim=lim)
    hit = hit_rate(reward, res.x)
    feats = None
    if x.ndim == 4:
        from ..metrics import classifier_features

        feats = classifier_features
    print(f"{a.method}{' (VP)' if a.vp else ''}: reward {reward.name} mean {float(res.rewards.mean()):.4f} "
          f"(min {float(res.rewards.min()):.4f}, max {float(res.rewards.max()):.4f})"
          + (f", hit rate {hit:.3f}" if hit is not None else "")
          + f", diversity {diversity(x, feats):.3f}; NFE used {res.nfe} of budget {res.budget} per output, "
          f"{a.n} outputs: {out} and {out.with_suffix('.npz')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("search", help="inference-time scaling: best-of-N / SMC / RBF against a reward at an NFE budget",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, or oracle:8gaussians")
    p.add_argument("--reward", required=True,
                   help="class:C | region:disc:cx,cy,r | region:halfplane:nx,ny,b (region options :hard, :soft=T)")
    p.add_argument("--method", default="rbf", choices=list(METHODS), help="search method (default rbf)")
    p.add_argument("--budget", type=int, default=100, help="velocity evaluations per output (default 100)")
    p.add_argument("--n", type=int, default=16, help="number of outputs (default 16)")
    p.add_argument("--steps", type=int, default=None, help="time steps (default 10 or the budget if smaller)")
    p.add_argument("--scale", type=float, default=3.0, help="SDE diffusion scale c in g = c sigma(t) (default 3)")
    p.add_argument("--vp", action="store_true", help="sample the VP interpolant converted from the model's path")
    p.add_argument("--label", type=int, default=None, help="class label for a conditional model (default: null)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="search.png", help="output image (plus .npz)")
    p.set_defaults(fn=cmd_search)
