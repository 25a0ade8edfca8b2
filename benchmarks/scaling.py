"""Inference-time scaling, measured: reward vs NFE budget for best-of-N (ODE, SDE), SMC and RBF, each
with and without the linear -> VP conversion, plus diversity; on digits (class reward) and on the
2D eight-Gaussians oracle. A section of ``straightflow bench control``.
"""
from __future__ import annotations

import time as _time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from straightflow import io as sfio, plotting
from straightflow.control.rewards import ClassLogProb, RegionReward
from straightflow.control.scaling import DEFAULT_SCALE, METHODS, diversity, hit_rate, search
from straightflow.metrics import classifier_features
from straightflow.oracle import GaussianMixtureFlow
from .harness import cached_model

__all__ = ["digits_model", "bench_scaling"]


def digits_model(out: str, quick: bool, run: Optional[str] = None):
    """``(model, run directory)``: a class-conditional digits UNet (base 16), ``run`` if given, else trained
    once and cached under ``<out>/runs`` (2500 steps; 40 with ``quick``); an interrupted training resumes."""
    steps = 40 if quick else 2500
    recipe = {"data": "digits", "steps": steps, "base_channels": 16, "batch_size": 64 if quick else 128,
              "ckpt_every": 500, "seed": 0}
    model, run_dir, _ = cached_model(Path(out), f"digits-c16-s{steps}", recipe, run=run)
    return model, run_dir


def bench_scaling(out: str, quick: bool = False, run: Optional[str] = None, seed: int = 0) -> str:
    """Reward vs NFE budget for best-of-N (ODE, SDE), SMC and RBF, each with and without the VP
    conversion, plus diversity; on digits (class reward, null-label sampling) and on the 2D
    eight-Gaussians oracle (a small disc in the tail of one mode). Writes
    ``scaling_reward_vs_budget.png``, ``scaling_digits_samples.png`` and ``scaling.json`` into ``out``;
    returns a Markdown section."""

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    budgets = [10, 50] if quick else [10, 20, 50, 100, 200, 500]
    model, run_dir = digits_model(out, quick, run)
    n_img = 8 if quick else 16
    tasks = [
        ("digits", model, ClassLogProb(3), (1, 8, 8), n_img, {"y": torch.full((n_img,), int(model.null_class))},
         classifier_features),
        ("2d", GaussianMixtureFlow.eight_gaussians(), RegionReward("disc", center=(2.4, 0.0), radius=0.15,
                                                                   temperature=0.05), (2,), 64, None, None),
    ]
    methods = list(METHODS)
    results: Dict[str, Any] = {"budgets": budgets, "tasks": {}}
    grids: Dict[str, Tensor] = {}
    t_start = _time.perf_counter()
    for name, mdl, rew, shape, n, cond, feats in tasks:
        rows = []
        for meth in methods:
            for vp in (False, True):
                row = {"method": meth, "vp": vp, "reward": [], "hit": [], "nfe": [], "diversity": [], "seconds": []}
                for b in budgets:
                    t0 = _time.perf_counter()
                    res = search(mdl, rew, shape, b, meth, n=n, cond=cond, vp=vp, seed=seed)
                    row["seconds"].append(round(_time.perf_counter() - t0, 3))
                    assert res.nfe <= b
                    row["reward"].append(float(res.rewards.mean()))
                    row["hit"].append(hit_rate(rew, res.x))
                    row["nfe"].append(res.nfe)
                    row["diversity"].append(diversity(res.x, feats))
                    if name == "digits" and not vp and b == budgets[-1]:
                        grids[meth] = res.x
                    if name == "digits" and not vp and b == budgets[0] and meth == "best_of_n":
                        grids["plain"] = res.x
                rows.append(row)
        results["tasks"][name] = {"reward": rew.name, "n": n, "rows": rows}
    results["seconds"] = round(_time.perf_counter() - t_start, 1)
    sfio.save_json(outp / "scaling.json", results)

    # plot: reward vs budget, one panel per task
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    colors = {"best_of_n": "tab:blue", "best_of_n_sde": "tab:orange", "smc": "tab:green", "rbf": "tab:red", "nrg": "tab:purple"}
    for ax, (name, *_rest) in zip(axes[0], tasks):
        for row in results["tasks"][name]["rows"]:
            ax.plot(budgets, row["reward"], marker="o", ms=3, color=colors[row["method"]],
                    ls="--" if row["vp"] else "-", label=f"{row['method']}{' +VP' if row['vp'] else ''}")
        ax.set_xscale("log")
        ax.set_xlabel("NFE budget per sample")
        ax.set_ylabel(f"mean reward: {results['tasks'][name]['reward']}")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    plotting.save_figure(fig, outp / "scaling_reward_vs_budget.png")
    panels = [("plain (NFE 10)", grids["plain"])] + [(f"{m} (NFE {budgets[-1]})", grids[m]) for m in methods]
    plotting.save_image_panels(panels, outp / "scaling_digits_samples.png", nrow=4)

    lines = ["## Inference-time scaling (reward vs NFE budget)", "",
             f"Digits: class-conditional UNet `{run_dir}` sampled with the null label, reward "
             f"`{tasks[0][2].name}` (project digits classifier), {n_img} outputs per cell. 2D: exact "
             f"eight-Gaussians field, reward `{tasks[1][2].name}`, 64 outputs. 10 time steps (fewer if the budget "
             f"is smaller), SDE diffusion g = {DEFAULT_SCALE:g} sigma(t), SMC lam = 10, RBF init_particles = 1; "
             "VP = linear -> VP interpolant conversion with SNR-matched grid. Cells: mean reward (hit rate); "
             "NFE used never exceeds the budget. Diversity: mean pairwise distance of the outputs at the largest "
             "budget (classifier features for digits). Seed "
             f"{seed}; {results['seconds']} s.", ""]
    for name, *_rest in tasks:
        tr = results["tasks"][name]
        lines.append(f"**{name}** ({tr['reward']})")
        lines.append("")
        lines.append("| method | VP | " + " | ".join(f"B={b}" for b in budgets) + f" | diversity@{budgets[-1]} | s@{budgets[-1]} |")
        lines.append("|---|---|" + "---|" * len(budgets) + "---|---|")
        for row in tr["rows"]:
            cells = [f"{r:.3f} ({h:.2f})" if h is not None else f"{r:.3f}" for r, h in zip(row["reward"], row["hit"])]
            lines.append(f"| {row['method']} | {'yes' if row['vp'] else 'no'} | " + " | ".join(cells)
                         + f" | {row['diversity'][-1]:.2f} | {row['seconds'][-1]:.1f} |")
        lines.append("")
    lines += ["![reward vs budget](scaling_reward_vs_budget.png)", "",
              "![digits samples](scaling_digits_samples.png)", ""]
    return "\n".join(lines)
