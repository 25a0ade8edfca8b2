"""Evaluate a trained velocity model against held-out data at several NFE, with the floor.

Used by ``straightflow eval`` and ``straightflow demo``: for vectors the metric is exact W2
(POT), for images the Fréchet distance in the project's own classifier's feature space; every
figure is printed beside its data-vs-data floor (:func:`straightflow.metrics.evaluate`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import data as sfdata
from . import metrics
from .checkpoint import RunInfo
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
    n: int = 0  # samples compared (the smaller of the samples drawn and the reference)


@dataclass
class Reference:
    """What a run's samples are scored against: ``data`` (held out whenever the run allows it), the
    ``floor`` data compared with it for the data-vs-data floor (None: two halves of ``data``), and
    a sentence saying which data this is."""

    data: sfdata.Dataset
    floor: Optional[sfdata.Dataset]
    description: str


def _count(n: Optional[int]) -> Optional[int]:
    return int(n) if n is not None and int(n) > 0 else None


def reference_data(source: str, n: Optional[int], seed: int = 0) -> sfdata.Dataset:
    """Held-out data for a run trained on ``source`` (a data set name or a file) with seed ``seed``:
    ``n`` fresh samples of a generated set (a seed disjoint from training's), else the held-out
    split of a fixed set (all of a set too small to split). ``n`` <= 0 or None: the default size."""
    if sfdata.is_generated(source):
        return sfdata.load_dataset(source, n=_count(n), seed=seed, split="test")
    full = sfdata.load_dataset(source)
    if sfdata.held_out_size(len(full)) == 0:
        return full
    return sfdata.load_dataset(source, split="test")


def run_reference(info: RunInfo, n: Optional[int]) -> Reference:
    """The reference data of a run (see :class:`Reference`): held-out data when the run was trained
    on a generated set or on the ``"train"`` split of a fixed one, else (a run that recorded no
    split, e.g. trained through the Python API on a whole data set) its training data, said so."""
    source = info.data_source
    if not source:
        raise ValueError("this run records no data source (config.json 'data_source'), so there is no data to "
                         "score it against")
    if sfdata.is_generated(source):
        ref = info.load_data("test", n=_count(n))
        return Reference(ref, None, f"{len(ref)} fresh {source} samples (a seed disjoint from the training "
                         "data's); floor: two disjoint halves of them")
    if info.data_split == "train":
        test, train = info.load_data("test"), info.load_data("train")
        return Reference(test, train, f"the {len(test)} held-out items of {source} (a fifth, never trained on); "
                         f"floor: as many of its {len(train)} training items against them")
    full = info.load_data()
    return Reference(full, None, f"{source} itself ({len(full)} items): this run recorded no held-out split (it was "
                     "trained on all of it), so these figures are on training data; floor: two halves of it")


def steps_for(spec, nfe: int) -> int:
    """Steps of ``spec`` for an NFE budget; a ValueError (not one silent step) below one step's cost."""
    one = spec.nfe(1)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < one:
        raise ValueError(f"NFE {nfe!r} is below the cost of one {spec.name} step ({one}); "
                         f"ask for NFE values >= {one}")
    return spec.steps_for_nfe(nfe)


def default_metric(x: Tensor) -> str:
    return "fd" if x.ndim == 4 else "w2"


def sample_like(model, n: int, shape: Sequence[int], seed: int, solver: str, steps: int,
                num_classes: Optional[int] = None, grid: str = "uniform", guidance: Optional[float] = None,
                batch_size: int = 2000, path: Any = "linear") -> tuple:
    """Draw ``n`` samples in batches from seeded noise (uniform random labels if conditional)."""
    noise, g = initial_noise((n, *shape), seed)
    y = torch.randint(num_classes, (n,), generator=g) if num_classes else None
    dev = next((p.device for p in model.parameters()), torch.device("cpu")) if hasattr(model, "parameters") \
        else torch.device("cpu")
    outs, nfe = [], 0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            cond = {"y": y[i:i + batch_size].to(dev)} if y is not None else None
            r = sample(model, noise[i:i + batch_size].to(dev), solver=solver, steps=steps, grid=grid, cond=cond,
                       guidance=guidance, path=path)
            outs.append(r.x.cpu())
            nfe = r.nfe
    return torch.cat(outs), y, nfe


def evaluate_model(model, reference: sfdata.Dataset, nfes: Sequence[int] = (1, 2, 4, 8, 100), solver: str = "euler",
                   n: int = 2000, seed: int = 0, metric: Optional[str] = None, grid: str = "uniform",
                   extractor: str = "digits", keep_samples: bool = False, path: Any = "linear",
                   floor_reference: Optional[sfdata.Dataset] = None, latent_shape: Optional[Sequence[int]] = None,
                   decode: Optional[Callable[[Tensor], Tensor]] = None) -> tuple:
    """Sample at each NFE from the same noise and score against ``reference``; returns (rows, samples).

    ``floor_reference``: other real data for the floor (see :func:`straightflow.metrics.evaluate`).
    ``latent_shape`` / ``decode``: a latent flow (noise of that shape, samples decoded before scoring).
    ``n`` is capped at what the reference can be compared with (the rows say how many were)."""
    spec = get_solver(solver)
    metric = metric or default_metric(reference.x)
    num_classes = getattr(model, "num_classes", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (samples to score), got {n!r}")
    cap = len(reference) if floor_reference is not None else len(reference) // 2
    if floor_reference is not None:
        cap = min(cap, len(floor_reference))
    n = min(n, cap)
    plan = [(nfe, steps_for(spec, nfe)) for nfe in nfes]  # every NFE checked before any work
    rows: List[EvalRow] = []
    samples: Dict[int, Tensor] = {}
    for nfe, steps in plan:
        t0 = time.perf_counter()
        shape = reference.x.shape[1:] if latent_shape is None else tuple(latent_shape)
        x, _, used = sample_like(model, n, shape, seed, spec.name, steps, num_classes, grid, path=path)
        if decode is not None:
            x = decode(x)
        secs = time.perf_counter() - t0
        rep = metrics.evaluate(x, reference.x, metric=metric, seed=seed, extractor=extractor,
                               floor_data=None if floor_reference is None else floor_reference.x)
        rows.append(EvalRow(spec.name, used, steps, rep.name, rep.value, rep.floor, rep.ratio, secs, rep.n))
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
                     cond=None, path: str = "linear", fine_steps: int = 200,
                     progress: bool = False) -> List[InversionRow]:
    """Reconstruction error of inversion for each deterministic solver at each NFE.

    ``x1`` is generated from ``x0`` by RK4 with ``fine_steps``; each solver inverts ``x1`` to
    ``z`` (1 -> 0) and regenerates ``sample(z)`` (0 -> 1) with the same NFE. Errors are RMSE over all
    elements; the round trip error falls with the solver's order. ``progress``: a bar over the
    (solver, NFE) round trips.
    """
    from tqdm.auto import tqdm

    from .solvers import invert

    specs = [get_solver(name) for name in solvers]
    specs = [s for s in specs if not (s.stochastic or s.adaptive)]
    bar = tqdm(total=1 + len(specs) * len(nfes), disable=not progress, unit="solve", desc="invert",
               dynamic_ncols=True)
    with torch.no_grad(), bar:
        bar.set_postfix_str(f"reference rk4 x {fine_steps}", refresh=False)
        x1 = sample(model, x0, solver="rk4", steps=fine_steps, cond=cond, path=path).x
        bar.update(1)
        rows = []
        for spec in specs:
            for nfe in nfes:
                bar.set_postfix_str(f"{spec.name} NFE {nfe}", refresh=False)
                steps = spec.steps_for_nfe(nfe)
                inv = invert(model, x1, solver=spec.name, steps=steps, cond=cond, path=path)
                back = sample(model, inv.x, solver=spec.name, steps=steps, cond=cond, path=path)
                noise_rmse = (inv.x - x0).pow(2).mean().sqrt().item()
                recon = (back.x - x1).pow(2).mean().sqrt().item()
                psnr = float("inf") if recon == 0 else 20 * torch.log10(torch.tensor(2.0 / recon)).item()
                rows.append(InversionRow(spec.name, inv.nfe, steps, noise_rmse, recon, psnr))
                bar.update(1)
    return rows


def inversion_markdown(rows: Sequence[InversionRow]) -> str:
    head = ("| solver | NFE (each way) | steps | noise RMSE | reconstruction RMSE | PSNR dB |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(f"| {r.solver} | {r.nfe} | {r.steps} | {r.noise_rmse:.3g} | {r.recon_rmse:.3g} | {r.psnr:.1f} |\n"
                          for r in rows)


def rows_to_markdown(rows: Sequence[EvalRow]) -> str:
    head = ("| solver | NFE | metric | samples | value | data-vs-data floor | ratio | sampling s |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r.solver} | {r.nfe} | {r.metric} | {r.n} | {r.value:.4g} | {r.floor:.4g} | {r.ratio:.2f}x | {r.seconds:.2f} |\n"
        for r in rows
    )
    return head + body
