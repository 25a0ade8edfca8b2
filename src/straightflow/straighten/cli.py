"""``straightflow pairs`` and ``straightflow reflow``: generate reflow pairs, train a k-RF.

    straightflow pairs RUN --n 8192 --out pairs/ [--solver rk4 --steps 32 --shard-size 1024]
    straightflow reflow RUN --pairs 8192 --solver rk4 --steps 32 --out runs/2rf [--train-steps 2000]
                        [--improved] [--anneal] [--guidance W]

Both resume after a kill (rerun the same command). Both run under ``torchrun`` (pairs are split
across ranks by shard; training uses DDP).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import checkpoint, paths
from ..solvers import available as solver_names


def _flow_path(cfg: dict) -> object:
    return (cfg.get("flow") or {}).get("path", "linear")


def _labels_for(model, choice: str):
    if choice == "auto":
        return "cycle" if getattr(model, "num_classes", None) else None
    return None if choice == "none" else choice


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _maybe_init_dist() -> bool:
    """Under torchrun, create the process group once so pair generation and training share it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def _add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="rk4", help=f"one of: {', '.join(solver_names())}")
    p.add_argument("--steps", type=int, default=32, help="solver steps per pair")
    p.add_argument("--grid", default="uniform", help="sampling grid name")
    p.add_argument("--labels", default="auto", choices=["auto", "none", "cycle", "random"],
                   help="class labels of the pairs (auto: cycle for a class-conditional teacher)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale of the teacher")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--pair-batch-size", type=int, default=None, help="rows integrated at once (default: a shard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


def _generate(a, teacher, cfg, n: int, out: Path) -> dict:
    from .pairs import generate_pairs

    return generate_pairs(teacher, out, n, solver=a.solver, steps=a.steps, grid=a.grid,
                          labels=_labels_for(teacher, a.labels), guidance=a.guidance, shard_size=a.shard_size,
                          seed=a.seed, path=_flow_path(cfg), batch_size=a.pair_batch_size, progress=not a.quiet)


def cmd_pairs(a) -> int:
    teacher = checkpoint.load(a.run)
    m = _generate(a, teacher, teacher.run_config, a.n, Path(a.out))
    if _main_rank():
        print(f"{m['n']} pairs in {m['num_shards']} shard(s) at {a.out}: {m['solver']}, {m['steps']} steps, "
              f"NFE {m['nfe_per_pair']} per pair, {m['total_nfe']} in total")
    return 0


def cmd_reflow(a) -> int:
    import torch.distributed as dist

    from .pairs import load_pairs
    from .reflow import reflow, straightness_report

    owns = _maybe_init_dist()
    try:
        teacher = checkpoint.load(a.run)
        cfg = teacher.run_config
        cfg["run_dir"] = str(a.run)
        out = Path(a.out)
        m = _generate(a, teacher, cfg, a.pairs, out / "pairs")
        ds = load_pairs(out / "pairs")
        path = a.path or _flow_path(cfg)
        anneal = None
        if a.anneal or a.anneal_steps:
            anneal = {"warmup": a.anneal_steps or max(1, a.train_steps // 2), "kind": a.anneal_kind}
        res = reflow(teacher, ds, a.train_steps, out=out, improved=a.improved, init=a.init, path=path,
                     time_dist=a.time_dist, loss=a.loss, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                     anneal=anneal, progress=not a.quiet, device=a.device)
        if not _main_rank():
            return 0
        before = straightness_report(teacher, a.eval_n, a.eval_steps, a.seed, path=_flow_path(cfg),
                                     guidance=a.guidance)
        after = straightness_report(res.model, a.eval_n, a.eval_steps, a.seed, path=path)
        report = {"pairs": {"n": m["n"], "solver": m["solver"], "steps": m["steps"],
                            "nfe_per_pair": m["nfe_per_pair"], "total_nfe": m["total_nfe"]},
                  "train_steps": a.train_steps, "final_loss": res.final_loss,
                  "before": before, "after": after}
        (out / "reflow_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"pairs: {m['n']} x NFE {m['nfe_per_pair']} = {m['total_nfe']} teacher evaluations "
              f"({m['solver']}, {m['steps']} steps); training: {a.train_steps} steps, final loss {res.final_loss:.4f}")
        print(f"straightness ({a.eval_steps}-step Euler, {a.eval_n} samples): before {before['straightness']:.4g}, "
              f"after {after['straightness']:.4g}")
        print(f"first-order deviation: before {before['first_order']:.4g}, after {after['first_order']:.4g}")
        print(f"k-RF written to {out} (report: {out / 'reflow_report.json'})")
        return 0
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def register(sub) -> None:
    """Add ``pairs`` and ``reflow`` to the ``straightflow`` subcommands."""
    p = sub.add_parser("pairs", help="generate reflow (noise, sample) pairs from a run (resumable, torchrun-parallel)")
    p.add_argument("run", help="teacher run directory")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="pairs directory (rerun the same command to resume)")
    _add_pair_args(p)
    p.set_defaults(fn=cmd_pairs)

    r = sub.add_parser("reflow", help="k-rectified flow: generate pairs from RUN, train the next flow, report straightness")
    r.add_argument("run", help="teacher run directory (the (k-1)-RF)")
    r.add_argument("--pairs", type=int, default=8192, help="number of pairs (written to OUT/pairs)")
    r.add_argument("--out", required=True, help="output run directory (resumes if it holds a state)")
    _add_pair_args(r)
    r.add_argument("--train-steps", type=int, default=2000)
    r.add_argument("--improved", action="store_true",
                   help="Lee et al. 2024: U-shaped times, pseudo-Huber + 1/t weighting, init from the teacher")
    r.add_argument("--anneal", action="store_true", help="SlimFlow annealing reflow (beta 1 -> 0 over half the run)")
    r.add_argument("--anneal-steps", type=int, default=None, help="annealing length in steps (implies --anneal)")
    r.add_argument("--anneal-kind", default="linear", choices=["linear", "cosine"])
    r.add_argument("--init", default="teacher", choices=["teacher", "scratch"])
    r.add_argument("--path", default=None, help=f"training path (default: the teacher's); one of {', '.join(paths.available())}")
    r.add_argument("--time-dist", default=None, help="override the training time distribution")
    r.add_argument("--loss", default=None, help="override the loss")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--device", default="cpu")
    r.add_argument("--eval-n", type=int, default=1024, help="trajectories for the straightness report")
    r.add_argument("--eval-steps", type=int, default=16, help="Euler steps for the straightness report")
    r.set_defaults(fn=cmd_reflow)

    try:
        from .onestep_cli import register as _r2
    except ModuleNotFoundError:
        _r2 = None
    if _r2:
        _r2(sub)
