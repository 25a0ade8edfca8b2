"""Normalizing-flow runs on the command line: ``train --model tarflow``, ``sample``, ``eval`` of an NF run.

``cli/core.py`` dispatches here (one line per command) when the model or run is a normalizing flow;
the work is done by :mod:`straightflow.nf`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import nf, plotting
from ..checkpoint import load, load_config, run_info
from ..metrics.frechet import classifier_fd
from ..report import run_reference
from ..system import machine_line
from . import flags

NF_MODELS = ("tarflow", "starflow")


def is_nf_model(name: str) -> bool:
    """``--model`` names a normalizing flow."""
    return str(name).lower() in NF_MODELS


def is_nf_run(run: str) -> bool:
    """``run`` is a normalizing-flow run directory (False for anything unreadable: core reports it)."""
    try:
        return nf.is_nf_config(load_config(run))
    except Exception:  # noqa: BLE001 - a broken run is reported by the flow-matching path's own checks
        return False


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The architecture flags of ``train --model tarflow|starflow``."""
    g = p.add_argument_group("normalizing flows (--model tarflow|starflow)")
    g.add_argument("--blocks", type=flags.positive_int, default=None, help="autoregressive blocks (default 4)")
    g.add_argument("--nf-width", type=flags.positive_int, default=None, help="transformer width (default 64)")
    g.add_argument("--nf-layers", type=flags.positive_int, default=None, help="layers per block (default 2)")
    g.add_argument("--deep-layers", type=flags.positive_int, default=None,
                   help="layers of the deep block next to the prior (STARFlow's deep-shallow design)")
    g.add_argument("--patch-size", type=flags.positive_int, default=None, help="image patch / values per token")
    g.add_argument("--noise-std", type=float, default=None, help="training noise sigma (default 0.05)")
    g.add_argument("--levels", type=int, default=None,
                   help="quantisation levels of the data for uniform dequantisation and bits/dim (e.g. 256, 17)")


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    """GS-Jacobi settings of ``sample --solver gs-jacobi`` on a normalizing-flow run."""
    g = p.add_argument_group("normalizing-flow runs (--solver sequential|gs-jacobi)")
    g.add_argument("--tol", type=float, default=1e-4, help="GS-Jacobi: stop a segment at this max change")
    g.add_argument("--segments", type=flags.positive_int, default=1, help="GS-Jacobi: segments per block")
    g.add_argument("--no-denoise", action="store_true", help="skip the score-based denoising step")


def cmd_train(a: argparse.Namespace) -> int:
    name = a.model.lower()
    over = {"blocks": a.blocks, "width": a.nf_width, "layers": a.nf_layers, "patch_size": a.patch_size,
            "noise_std": a.noise_std, "levels": a.levels, "deep_layers": a.deep_layers}
    if name == "starflow":  # three stages: autoencoder (--steps), latent deep-shallow flow (--steps), denoiser
        s = flags.train_settings(a)
        nf.train_starflow(a.data, a.out, ae_steps=s.steps, flow_steps=s.steps, denoiser_steps=max(1, s.steps // 4),
                          noise_std=0.1 if a.noise_std is None else a.noise_std, deep_layers=a.deep_layers or 4,
                          layers=a.nf_layers or 1, blocks=a.blocks or 4, width=a.nf_width or 64,
                          patch_size=a.patch_size or 1, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                          conditional=not a.unconditional, n=a.n, progress=s.progress)
        print(f"trained a STARFlow (autoencoder, latent flow, denoiser); run written to {a.out}")
        return 0
    res = nf.train_nf(a.data, a.out, settings=flags.train_settings(a), cond_dropout=a.cond_dropout,
                      conditional=not a.unconditional, n=a.n, allow_recipe_change=a.allow_recipe_change,
                      model_overrides=over)
    with torch.no_grad():
        print(f"trained {res.steps} steps, final NLL {res.final_loss:.4f} nats/dim; run written to {res.run_dir}")
    return 0


def _labels(model, n: int, label: Optional[int]) -> Optional[torch.Tensor]:
    k = model.num_classes
    if not k:
        if label is not None:
            raise ValueError("--label/--guidance need a class-conditional model")
        return None
    if label is None:
        return torch.arange(n) % k
    if not 0 <= label < k:
        raise ValueError(f"--label must be in [0, {k}), got {label}")
    return torch.full((n,), label, dtype=torch.long)


def cmd_sample(a: argparse.Namespace) -> int:
    dev = flags.device(a)
    model = load(a.run, device=dev)
    solver = "sequential" if a.solver == "euler" else a.solver  # euler: the flow-matching default
    nf.NF_SOLVERS.canonical(solver)  # unknown name: the one-line error listing the NF solvers
    y = _labels(model, a.n, a.label)
    if a.guidance is not None and y is None:
        raise ValueError("--guidance needs a class-conditional model")
    g = torch.Generator().manual_seed(a.seed)
    noise = torch.randn((a.n, *getattr(model, "latent_flow", model).sample_shape), generator=g)
    out = nf.sample_nf(model, noise.to(dev), None if y is None else y.to(dev), solver=solver, guidance=a.guidance,
                       tol=a.tol, segments=a.segments, denoise=not a.no_denoise)
    x = out.x.cpu()
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x.numpy(), "noise": noise.numpy()}
    if y is not None:
        arrays["y"] = y.numpy()
    np.savez(path.with_suffix(".npz"), **arrays)
    title = f"{out.solver}, {out.calls} transformer calls"
    if x.ndim == 4:
        plotting.save_image_panels([(title, x[:100].clamp(-1, 1))], path)
    else:
        plotting.save_scatter_panels([(title, x[:, :2])], path)
    print(f"{a.n} samples, {out.calls} transformer calls ({out.solver}): {path} and {path.with_suffix('.npz')}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    dev = flags.device(a)
    model = load(a.run, device=dev)
    info = run_info(model)
    ref = run_reference(info, max(2 * a.n, 4))
    g = torch.Generator().manual_seed(a.seed)
    test = ref.data
    y = test.y if model.num_classes else None
    lines = [f"# Evaluation of `{a.run}` (normalizing flow)", "", f"Scored against {ref.description}.  ",
             f"{machine_line()}", "", "| metric | value |", "|---|---|"]
    with torch.no_grad():
        batches = [(test.x[i:i + 256].to(dev), None if y is None else y[i:i + 256].to(dev))
                   for i in range(0, len(test), 256)]
        if hasattr(model, "latent_flow"):  # STARFlow: an exact likelihood of the latents, not of the pixels
            nll = torch.cat([-model.log_prob(xb, yb).cpu() for xb, yb in batches]) / model.latent_flow.dim
            lines.append(f"| latent NLL (held-out, nats/dim of the autoencoder latents) | {nll.mean().item():.4f} |")
        else:
            bpd = torch.cat([model.bits_per_dim(xb, yb, generator=g).cpu() for xb, yb in batches])
            lines.append(f"| bits/dim (held-out, {len(test)} items; uniform dequantisation, {model.levels or 256} "
                         f"levels) | {bpd.mean().item():.4f} ± {bpd.std().item() / max(1, len(bpd)) ** 0.5:.4f} |")
    if test.x.ndim == 4 and test.x.shape[1] == 1:
        n = min(a.n, len(test))
        out = nf.sample_nf(model, n, None if y is None else (torch.arange(n) % model.num_classes).to(dev),
                           solver="sequential", seed=a.seed)
        try:
            fd = classifier_fd(out.x.cpu().clamp(-1, 1), test.x[:n], extractor=a.extractor)
            floor = classifier_fd(ref.floor.x[:n], test.x[:n], extractor=a.extractor) if ref.floor is not None else None
            lines.append(f"| FD ({a.extractor} classifier, {n} samples) | {fd:.3f} |")
            if floor is not None:
                lines.append(f"| FD floor (training vs held-out) | {floor:.3f} |")
        except ValueError as e:
            lines.append(f"| FD | n/a ({e}) |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    return 0
