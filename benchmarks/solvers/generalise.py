"""Does a calibrated solver hold on fields nobody tuned it to? Random Gaussian-mixture fields, calibrated
with the library defaults, scored against the best peer on an evaluation batch the calibration never saw.

The family (``mixture_field(dim, draw)``): 8 components; means uniform in a ball of radius 3 (``means
spread 3``); isotropic component scales log-uniform in [0.05, 0.5] (sharp modes: trajectories split
near the boundaries between them); weights uniform in [0.5, 1.5], normalised. The exact rectified-flow
velocity of a mixture is closed-form (:class:`straightflow.oracle.GaussianMixtureFlow`), so every error
here is the solver's.

Protocol (one cell = one field, one NFE):

* calibration: ``straightflow.optimize.calibrate(field, "learned", "auto", nfe, save=False, seed=s)``,
  nothing else (the library defaults: self-sized batches within the default CPU budget); its
  noise is drawn from seeds of its own;
* evaluation: 512 samples of noise seed :data:`EVAL_SEED` (never a calibration seed), float64 dopri5
  reference at rtol 1e-10;
* peers: every peer sampler (diffusers, torchdiffeq, flow_matching, rectified-flow) that can spend
  exactly that NFE; the ratio is calibrated RMSE / best peer RMSE, in the same run.

Reported per dimension and NFE: the median and the worst ratio over the field draws, and, on one field,
the spread (max / min ratio) over calibration seeds.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

import straightflow as sf
from straightflow.optimize import calibrate
from straightflow.oracle import GaussianMixtureFlow

from .peers import Peer

__all__ = ["mixture_field", "Cell", "evaluate_cell", "run_generalisation", "render"]

EVAL_SEED = 987_654
EVAL_BATCH = 512
N_COMPONENTS = 8
MEAN_RADIUS = 3.0
SCALES = (0.05, 0.5)


def mixture_field(dim: int, draw: int) -> GaussianMixtureFlow:
    """Field ``draw`` of the family in ``dim`` dimensions (see the module docstring)."""
    g = torch.Generator().manual_seed(10_007 * int(dim) + int(draw))
    K = N_COMPONENTS
    d = torch.randn(K, dim, generator=g, dtype=torch.float64)
    r = torch.rand(K, 1, generator=g, dtype=torch.float64) ** (1.0 / dim)
    means = MEAN_RADIUS * r * d / d.norm(dim=1, keepdim=True)
    lo, hi = math.log(SCALES[0]), math.log(SCALES[1])
    stds = torch.exp(lo + (hi - lo) * torch.rand(K, generator=g, dtype=torch.float64))
    w = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
    return GaussianMixtureFlow(means, stds=stds, weights=w / w.sum())


def _rmse(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@dataclass
class Cell:
    dim: int
    draw: int
    nfe: int
    seed: int
    learned: float
    best_peer: float
    best_peer_name: str
    cpu_s: float
    batch: int

    @property
    def ratio(self) -> float:
        return self.learned / self.best_peer


class _Eval:
    """The evaluation batch of one field, its reference, and the peers' errors per NFE (cached)."""

    def __init__(self, field: GaussianMixtureFlow, peers: Sequence[Peer]) -> None:
        self.field = field
        self.x0 = torch.randn(EVAL_BATCH, field.dim, generator=torch.Generator().manual_seed(EVAL_SEED),
                              dtype=torch.float64)
        self.ref = sf.sample(field, self.x0, solver="dopri5", steps=1, rtol=1e-10, atol=1e-10).x
        self.peers = list(peers)
        self._best: Dict[int, tuple] = {}

    def best_peer(self, nfe: int) -> tuple:
        if nfe not in self._best:
            best = (math.inf, "none")
            x = self.x0.float()
            for p in self.peers:
                steps = p.steps_for(nfe)
                if steps is None:
                    continue
                with torch.no_grad():
                    out = p.run(lambda y, t: self.field(y, torch.as_tensor(t, dtype=y.dtype).expand(y.shape[0])),
                                x.clone(), steps)
                e = _rmse(out, self.ref)
                if math.isfinite(e) and e < best[0]:
                    best = (e, f"{p.library} {p.name}")
            self._best[nfe] = best
        return self._best[nfe]


def evaluate_cell(ev: _Eval, dim: int, draw: int, nfe: int, seed: int, **calibrate_kw) -> Cell:
    t = time.process_time()
    cal = calibrate(ev.field, "learned", "auto", nfe, save=False, seed=seed, **calibrate_kw)
    cpu = time.process_time() - t
    with torch.no_grad():
        out = sf.sample(ev.field, ev.x0.float(), solver=cal).x
    best, name = ev.best_peer(nfe)
    batch = int((cal.info.get("sizing") or {}).get("batch") or cal.reference.get("calib_batch") or 0)
    return Cell(dim, draw, nfe, seed, _rmse(out, ev.ref), best, name, cpu, batch)


def run_generalisation(peers: Sequence[Peer], dims: Sequence[int] = (2, 16, 64), draws: int = 5,
                       nfes: Sequence[int] = tuple(range(4, 11)), seeds: int = 5, spread_dim: int = 2,
                       progress=None, **calibrate_kw) -> List[Cell]:
    """Every (dim, draw, NFE) cell with calibration seed 0, plus seeds 1.. on draw 0 of ``spread_dim``."""
    cells: List[Cell] = []
    jobs = [(d, k, n, 0) for d in dims for k in range(draws) for n in nfes]
    jobs += [(spread_dim, 0, n, s) for n in nfes for s in range(1, seeds)]
    evals: Dict[tuple, _Eval] = {}
    for d, k, n, s in jobs:
        if (d, k) not in evals:
            evals[(d, k)] = _Eval(mixture_field(d, k), peers)
        cells.append(evaluate_cell(evals[(d, k)], d, k, n, s, **calibrate_kw))
        if progress is not None:
            progress(cells[-1])
    return cells


def _summary(cells: List[Cell], dim: int, nfe: int, spread_dim: int) -> Optional[dict]:
    base = [c for c in cells if c.dim == dim and c.nfe == nfe and c.seed == 0]
    if not base:
        return None
    r = [c.ratio for c in base]
    seeds = [c.ratio for c in cells if c.dim == dim and c.nfe == nfe and c.draw == 0]
    return {"median": statistics.median(r), "worst": max(r), "n": len(r),
            "spread": (max(seeds) / min(seeds)) if dim == spread_dim and len(seeds) > 1 else None,
            "cpu_median": statistics.median(c.cpu_s for c in base), "cpu_max": max(c.cpu_s for c in base),
            "batch": statistics.median(c.batch for c in base)}


def render(cells: List[Cell], spread_dim: int = 2) -> List[str]:
    """Markdown: one row per (dim, NFE)."""
    dims = sorted({c.dim for c in cells})
    nfes = sorted({c.nfe for c in cells})
    lines = ["| dim | NFE | median ratio | worst ratio | seed spread (max/min) | draws | calibration CPU s (median / max) "
             "| self-sized batch (median) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in dims:
        for n in nfes:
            s = _summary(cells, d, n, spread_dim)
            if s is None:
                continue
            sp = "" if s["spread"] is None else f"{s['spread']:.2f}"
            lines.append(f"| {d} | {n} | {s['median']:.3f} | {s['worst']:.3f} | {sp} | {s['n']} | "
                         f"{s['cpu_median']:.1f} / {s['cpu_max']:.1f} | {s['batch']:.0f} |")
    return lines


def plot(path, cells: List[Cell]) -> Optional[str]:
    """Median and worst ratio per NFE, one line per dimension; the 1/3 and 1/2 targets dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for d in sorted({c.dim for c in cells}):
        nfes = sorted({c.nfe for c in cells if c.dim == d})
        med = [statistics.median(c.ratio for c in cells if c.dim == d and c.nfe == n and c.seed == 0) for n in nfes]
        worst = [max(c.ratio for c in cells if c.dim == d and c.nfe == n and c.seed == 0) for n in nfes]
        line, = ax.plot(nfes, med, marker="o", label=f"{d}D median")
        ax.plot(nfes, worst, marker="v", ls=":", color=line.get_color(), label=f"{d}D worst")
    ax.axhline(1 / 3, ls="--", color="gray", lw=0.8)
    ax.axhline(1 / 2, ls="--", color="gray", lw=0.8)
    ax.axhline(1.0, ls="-", color="k", lw=0.5)
    ax.set_xlabel("NFE")
    ax.set_ylabel("calibrated RMSE / best peer RMSE")
    ax.set_yscale("log")
    ax.set_title("Fields nobody tuned to: random sharp mixtures")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def bench_generalise(out_dir, peers, peer_info, command: str, threads: int = 1, dims=(2, 16, 64), draws: int = 5,
                     nfes=tuple(range(4, 11)), seeds: int = 5, quick: bool = False, log=print) -> str:
    """The generalisation section of ``bench solvers`` (``--generalise``): writes ``generalise.md/.json/.png``."""
    from pathlib import Path

    from ..harness import Report, Timing

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"budget_s": 5.0} if quick else {}
    t0 = time.perf_counter()
    cells = run_generalisation(peers, dims, draws, nfes, seeds, spread_dim=dims[0],
                               progress=lambda c: log(f"{c.dim}D draw {c.draw} NFE {c.nfe} seed {c.seed}: ratio "
                                                      f"{c.ratio:.3f} ({c.cpu_s:.1f} CPU s, batch {c.batch})"), **kw)
    rep = Report("Calibrated solvers on fields nobody tuned to", command,
                 Timing(threads, repeats=0, note="Calibration cost: CPU seconds (time.process_time) per calibrate call."),
                 quick=quick)
    rep.add(__doc__.split("\n\n", 1)[1].strip(), "",
            "Peers: " + ", ".join(f"{k} {v.get('version', '?')}" for k, v in sorted(peer_info.items())) + ".", "")
    rep.add(*render(cells, spread_dim=dims[0]), "")
    png = plot(out / "generalise.png", cells)
    if png:
        rep.add("![ratio per NFE](generalise.png)", "")
    rep.add(f"Whole section: {time.perf_counter() - t0:.0f} s wall.")
    rep.write(out, "generalise", {"cells": [vars(c) | {"ratio": c.ratio} for c in cells]})
    return rep.render()
