"""Training-step overhead: straightflow's Trainer against a bare PyTorch loop and peer recipes.

All contenders run in ONE process on the same network (``straightflow.models.MLP(dim=2, ...)``,
same initial weights), the same data (``toy_2d("checkerboard")``), the same batch size and the
same optimiser (``torch.optim.AdamW(lr=1e-3)``, defaults otherwise):

1. ``bare loop``: sample indices, ``x0``, ``t``; interpolate; MSE; backward; AdamW step.
2. ``straightflow Trainer``: ``Trainer(..., out=None, ema_decay=0, progress=False)``, i.e. EMA,
   progress bar and checkpoint files off (``out=None`` writes nothing); its defaults stay on:
   gradient clipping at 1.0, the per-step NaN/Inf guard, epoch-wise sampling. Construction of
   the Trainer is inside the timed region.
3. ``torchcfm``: ``ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow``.
4. ``flow_matching``: ``AffineProbPath(scheduler=CondOTScheduler()).sample(...)``.

Peers are optional (``pip install torchcfm flow_matching``); a missing one is listed as skipped.
Each repeat runs every contender once (the order rotates between repeats) after one warm-up
run each; a contender's time is its median ms/step over the repeats, with the inter-quartile range.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from straightflow import plotting
from straightflow.data import toy_2d
from straightflow.flow import Flow
from straightflow.models import MLP
from straightflow.system import cpu_model
from straightflow.train import Trainer
from .harness import Report, Timing, register_suite, run_suite, write_report

__all__ = ["bench_train"]


def _peer_cfm():
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    return ConditionalFlowMatcher(sigma=0.0)


def _peer_fm():
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    return AffineProbPath(scheduler=CondOTScheduler())


def bench_train(
    out_dir: Union[str, os.PathLike],
    steps: int = 300,
    batch_size: int = 256,
    hidden: int = 256,
    repeats: int = 5,
    threads: int = 1,
    seed: int = 0,
    depth: int = 4,
    n_data: int = 50_000,
    lr: float = 1e-3,
    command: str = "",
) -> str:
    """Time one training step of each contender; write ``train.md`` and ``train.png`` to ``out_dir``.

    Returns the Markdown report. No timing is asserted anywhere; the numbers depend on the machine.
    """
    if steps < 1 or repeats < 1 or batch_size < 1 or threads < 1:
        raise ValueError("steps, repeats, batch_size and threads must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = toy_2d("checkerboard", n_data, seed=seed)
        n, B = x.shape[0], batch_size

        def make_model() -> torch.nn.Module:
            torch.manual_seed(seed)
            return MLP(dim=2, hidden=hidden, depth=depth)

        def manual(step_loss: Callable) -> Callable[[int], Callable[[], None]]:
            """A hand-written loop whose loss comes from ``step_loss(model, x1, x0, g)``."""

            def setup(k: int) -> Callable[[], None]:
                model = make_model()

                def go() -> None:
                    opt = torch.optim.AdamW(model.parameters(), lr=lr)
                    g = torch.Generator().manual_seed(seed)
                    for _ in range(k):
                        idx = torch.randint(n, (B,), generator=g)
                        x1 = x.index_select(0, idx)
                        x0 = torch.randn(x1.shape, generator=g)
                        loss = step_loss(model, x1, x0, g)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()

                return go

            return setup

        def bare_loss(model, x1, x0, g):
            t = torch.rand(B, generator=g)
            tt = t[:, None]
            xt = tt * x1 + (1 - tt) * x0
            return (model(xt, t) - (x1 - x0)).pow(2).mean()

        def trainer_setup(k: int) -> Callable[[], None]:
            model = make_model()

            def go() -> None:
                Trainer(Flow(model), x, None, k, batch_size=B, lr=lr, ema_decay=0, progress=False, seed=seed).fit()

            return go

        contenders: List[Tuple[str, Optional[Callable], str]] = [
            ("bare PyTorch loop", manual(bare_loss), ""),
            ("straightflow Trainer", trainer_setup, "EMA/progress/checkpoints off (out=None); grad_clip=1.0 + NaN guard on"),
        ]
        try:
            cfm = _peer_cfm()

            def cfm_loss(model, x1, x0, g):
                t, xt, ut = cfm.sample_location_and_conditional_flow(x0, x1)
                return (model(xt, t) - ut).pow(2).mean()

            contenders.append(("torchcfm recipe", manual(cfm_loss), "ConditionalFlowMatcher(sigma=0)"))
        except Exception as e:  # ImportError or a broken install
            contenders.append(("torchcfm recipe", None, f"skipped: not importable ({type(e).__name__})"))
        try:
            fm_path = _peer_fm()

            def fm_loss(model, x1, x0, g):
                t = torch.rand(B, generator=g)
                ps = fm_path.sample(t=t, x_0=x0, x_1=x1)
                return (model(ps.x_t, ps.t) - ps.dx_t).pow(2).mean()

            contenders.append(("flow_matching recipe", manual(fm_loss), "AffineProbPath(CondOTScheduler)"))
        except Exception as e:
            contenders.append(("flow_matching recipe", None, f"skipped: not importable ({type(e).__name__})"))

        active = [(name, setup) for name, setup, _ in contenders if setup is not None]
        warm = max(5, steps // 5)
        for _, setup in active:  # warm-up run (allocator, kernels, lazy imports)
            setup(warm)()
        times: Dict[str, List[float]] = {name: [] for name, _ in active}
        for r in range(repeats):
            order = active[r % len(active):] + active[: r % len(active)]
            for name, setup in order:
                go = setup(steps)
                t0 = time.perf_counter()
                go()
                times[name].append((time.perf_counter() - t0) * 1e3 / steps)
    finally:
        torch.set_num_threads(prev_threads)

    stats = {}
    for name, ts in times.items():
        q25, q50, q75 = np.percentile(ts, [25, 50, 75])
        stats[name] = (float(q50), float(q75 - q25), float(q25), float(q75))
    base = stats["bare PyTorch loop"][0]
    load = ""
    try:
        load = " Load average at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + "."
    except OSError:
        pass
    report = Report("Training-step overhead", command or "straightflow bench train",
                    Timing(threads, warmup=1, repeats=repeats, clock="wall clock (time.perf_counter), ms per step",
                           note="Contenders interleaved (order rotated each repeat), all in one process."),
                    machine_note=f"{cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}.{load}")
    report.add(
        f"Setup: `MLP(dim=2, hidden={hidden}, depth={depth})`, checkerboard data (n={n}), batch {batch_size}, "
        f"AdamW(lr={lr}); {steps} steps per run; median over {repeats} repeats after a warm-up run, "
        "contenders interleaved (order rotated each repeat), all in one process.",
        "",
        "| contender | ms/step (median) | IQR | ratio to bare loop |",
        "|---|---|---|---|",
    )
    for name, _, note in contenders:
        label = f"{name} ({note})" if note and name in stats else name
        if name in stats:
            med, iqr = stats[name][:2]
            report.add(f"| {label} | {med:.3f} | {iqr:.3f} | {med / base:.3f} |")
        else:
            report.add(f"| {name} ({note}) | n/a | n/a | n/a |")
    md = report.render()
    write_report(out, "train", md)
    _plot(out / "train.png", stats, base, threads)
    return md


def _plot(path: Path, stats: Dict[str, Tuple[float, float, float, float]], base: float, threads: int) -> None:
    names = list(stats)
    med = np.array([stats[k][0] for k in names])
    err = np.array([[stats[k][0] - stats[k][2] for k in names], [stats[k][3] - stats[k][0] for k in names]])
    fig, ax = plotting.pyplot().subplots(figsize=(7, 3.2 + 0.3 * len(names)))
    ypos = np.arange(len(names))
    ax.barh(ypos, med, xerr=err, color=["#888888"] + ["#3a78c2"] * (len(names) - 1), capsize=3)
    ax.set_yticks(ypos, labels=names)
    ax.invert_yaxis()
    ax.axvline(base, color="k", lw=0.8, ls="--")
    for i, m in enumerate(med):
        ax.text(m, i, f"  {m / base:.2f}x", va="center")
    ax.set_xlabel(f"ms per training step (median, IQR bars; {threads} thread(s))")
    ax.set_xlim(0, med.max() * 1.25)
    fig.tight_layout()
    plotting.save_figure(fig, path)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


def run(a: argparse.Namespace) -> int:
    steps, repeats = (min(a.steps, 30), min(a.repeats, 2)) if a.quick else (a.steps, a.repeats)
    print(bench_train(a.out, steps=steps, repeats=repeats, threads=a.threads, batch_size=a.batch_size, seed=a.seed,
                      command=a.command))
    return 0


SUITE = register_suite("train", "training-step overhead against a bare PyTorch loop, torchcfm and flow_matching",
                       _arguments, run, doc=__doc__.split("\n\n")[0])


def main(argv: Optional[List[str]] = None) -> int:
    """``straightflow bench train ARGS``."""
    return run_suite("train", argv)
