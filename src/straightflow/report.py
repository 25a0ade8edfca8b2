"""Evaluate a trained velocity model against held-out data at several NFE, with the floor.

Used by ``straightflow eval`` and ``straightflow demo``: for vectors the metric is exact W2
(POT), for images the Fréchet distance in the project's own classifier's feature space; every
figure is printed beside its data-vs-data floor (:func:`straightflow.metrics.evaluate`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import data as sfdata
from . import metrics
from .solvers import get_solver, initial_noise, sample


@dataclass
class EvalRow:
    solver: str
    nfe: int
    steps: int
    metric: str
    value: float
    floor: float
    ratio: float
    seconds: float


def reference_data(source: str, n: int, seed: int = 12345) -> sfdata.Dataset:
    """Held-out data for a run trained on ``source`` (a data set name or a file): fresh samples of
    a 2D toy (a seed the training never used), else the data set itself."""
    if source in sfdata.TOYS:
        return sfdata.Dataset(sfdata.toy_2d(source, n, seed=seed), name=source)
    return sfdata.load_dataset(source)


def default_metric(x: Tensor) -> str:
    return "fd" if x.ndim == 4 else "w2"


def sample_like(model, n: int, shape: Sequence[int], seed: int, solver: str, steps: int,
                num_classes: Optional[int] = None, grid: str = "uniform", guidance: Optional[float] = None,
                batch_size: int = 2000, path: Any = "linear") -> tuple:
    """Draw ``n`` samples in batches from seeded noise (uniform random labels if conditional)."""
    noise, g = initial_noise((n, *shape), seed)
    y = torch.randint(num_classes, (n,), generator=g) if num_classes else None
    outs, nfe = [], 0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            cond = {"y": y[i:i + batch_size]} if y is not None else None
            r = sample(model, noise[i:i + batch_size], solver=solver, steps=steps, grid=grid, cond=cond,
                       guidance=guidance, path=path)
            outs.append(r.x)
            nfe = r.nfe
    return torch.cat(outs), y, nfe


def evaluate_model(model, reference: sfdata.Dataset, nfes: Sequence[int] = (1, 2, 4, 8, 100), solver: str = "euler",
                   n: int = 2000, seed: int = 0, metric: Optional[str] = None, grid: str = "uniform",
                   extractor: str = "digits", keep_samples: bool = False, path: Any = "linear") -> tuple:
    """Sample at each NFE from the same noise and score against ``reference``; returns (rows, samples)."""
    spec = get_solver(solver)
    metric = metric or default_metric(reference.x)
    num_classes = getattr(model, "num_classes", None)
    rows: List[EvalRow] = []
    samples: Dict[int, Tensor] = {}
    for nfe in nfes:
        steps = spec.steps_for_nfe(nfe)
        t0 = time.perf_counter()
        x, _, used = sample_like(model, n, reference.x.shape[1:], seed, spec.name, steps, num_classes, grid, path=path)
        secs = time.perf_counter() - t0
        rep = metrics.evaluate(x, reference.x, metric=metric, seed=seed, extractor=extractor)
        rows.append(EvalRow(spec.name, used, steps, rep.name, rep.value, rep.floor, rep.ratio, secs))
        if keep_samples:
            samples[nfe] = x
    return rows, samples


@dataclass
class InversionRow:
    solver: str
    nfe: int
    steps: int
    noise_rmse: float    # ||invert(x1) - x0|| where x1 was generated from x0 by a fine solve
    recon_rmse: float    # ||sample(invert(x1)) - x1|| with the same solver both ways
    psnr: float          # reconstruction PSNR (images in [-1, 1]; data range 2)


def inversion_report(model, x0: Tensor, solvers: Sequence[str], nfes: Sequence[int] = (4, 8, 16, 32),
                     cond=None, path: str = "linear", fine_steps: int = 200) -> List[InversionRow]:
    """Reconstruction error of inversion for each deterministic solver at each NFE.

    ``x1`` is generated from ``x0`` by RK4 with ``fine_steps``; each solver inverts ``x1`` to
    ``z`` (1 -> 0) and regenerates ``sample(z)`` (0 -> 1) with the same NFE. Errors are RMSE over all
    elements; the round trip error falls with the solver's order.
    """
    from .solvers import invert

    with torch.no_grad():
        x1 = sample(model, x0, solver="rk4", steps=fine_steps, cond=cond, path=path).x
        rows = []
        for name in solvers:
            spec = get_solver(name)
            if spec.stochastic or spec.adaptive:
                continue
            for nfe in nfes:
                steps = spec.steps_for_nfe(nfe)
                inv = invert(model, x1, solver=spec.name, steps=steps, cond=cond, path=path)
                back = sample(model, inv.x, solver=spec.name, steps=steps, cond=cond, path=path)
                noise_rmse = (inv.x - x0).pow(2).mean().sqrt().item()
                recon = (back.x - x1).pow(2).mean().sqrt().item()
                psnr = float("inf") if recon == 0 else 20 * torch.log10(torch.tensor(2.0 / recon)).item()
                rows.append(InversionRow(spec.name, inv.nfe, steps, noise_rmse, recon, psnr))
    return rows


def inversion_markdown(rows: Sequence[InversionRow]) -> str:
    head = ("| solver | NFE (each way) | steps | noise RMSE | reconstruction RMSE | PSNR dB |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(f"| {r.solver} | {r.nfe} | {r.steps} | {r.noise_rmse:.3g} | {r.recon_rmse:.3g} | {r.psnr:.1f} |\n"
                          for r in rows)


def rows_to_markdown(rows: Sequence[EvalRow]) -> str:
    head = "| solver | NFE | metric | value | data-vs-data floor | ratio | sampling s |\n|---|---:|---|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {r.solver} | {r.nfe} | {r.metric} | {r.value:.4g} | {r.floor:.4g} | {r.ratio:.2f}x | {r.seconds:.2f} |\n"
        for r in rows
    )
    return head + body
