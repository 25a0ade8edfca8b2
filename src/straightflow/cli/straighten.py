"""``straightflow pairs | reflow | distill | meanflow``: straighten and compress a flow.

    straightflow pairs RUN --n 8192 --out pairs/ [--solver rk4 --steps 32 --shard-size 1024]
    straightflow reflow RUN --pairs 8192 --solver rk4 --steps 32 --out runs/2rf [--train-steps 2000]
                        [--improved] [--anneal] [--guidance W]
    straightflow distill SOURCE --out runs/1step --k 1 [--student-hidden 64]
    straightflow meanflow --data moons --out runs/mf [--split]

``pairs`` and ``reflow`` resume after a kill (rerun the same command) and run under ``torchrun``
(pairs are split across ranks by shard; training uses DDP). ``distill`` and ``meanflow`` print
quality at NFE 1 and 2 (exact W2 for vectors, classifier Fréchet distance for images, each beside
its data-vs-data floor) and write it to ``OUT/onestep_report.md``.

Conditional straightening (InstaFlow with class labels)::

    straightflow reflow TEACHER --guidance 2 --pairs 8192 --out rf2   # the 2-RF learns the guided flow
    straightflow distill rf2 --out onestep --k 1                      # pairs from the 2-RF (labels cycle)

The student takes ``y`` and samples in one step without guidance (library:
:func:`straightflow.straighten.distill.conditional_onestep`). ``straightflow distill TEACHER
--guidance W`` distils the guided teacher directly, skipping the 2-RF.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import checkpoint, data as sfdata, metrics, paths, report
from ..checkpoint import run_info
from ..losses import available as loss_names
from ..models import build_model, count_parameters
from ..runs import default_model_config
from ..solvers import available as solver_names, sample
from ..straighten.distill import distill, slimflow_distill
from ..straighten.meanflow import MeanFlow, SplitMeanFlow, init_from_velocity, sample_mean
from ..straighten.pairs import generate_pairs, load_pairs
from ..straighten.reflow import default_ema, reflow, straightness_report
from ..system import machine_line
from ..time import available as time_names
from ..train import train
from . import flags


def _labels_for(model, choice: str):
    if choice == "auto":
        return "cycle" if getattr(model, "num_classes", None) else None
    return None if choice == "none" else choice


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _maybe_init_dist() -> bool:
    """Under torchrun, create the process group once so pair generation and training share it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


PAIR_SOLVER, PAIR_STEPS = "rk4", 32


def _add_pair_args(p: argparse.ArgumentParser, reuse: bool = False) -> None:
    """The pair-generation flags; ``reuse``: the command may be given existing pairs instead, so
    --solver/--steps stay None unless given (then checked against those pairs)."""
    p.add_argument("--solver", default=None if reuse else PAIR_SOLVER,
                   help=f"one of: {', '.join(solver_names())}" + (f" (default: {PAIR_SOLVER})" if reuse else ""))
    p.add_argument("--steps", type=int, default=None if reuse else PAIR_STEPS,
                   help="solver steps per pair" + (f" (default: {PAIR_STEPS})" if reuse else ""))
    p.add_argument("--grid", default="uniform", help="sampling grid name")
    p.add_argument("--labels", default="auto", choices=["auto", "none", "cycle", "random"],
                   help="class labels of the pairs (auto: cycle for a class-conditional teacher)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale of the teacher")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--pair-batch-size", type=int, default=None, help="rows integrated at once (default: a shard)")
    flags.add_seed(p)
    flags.add_device(p)
    flags.add_quiet(p)


def _generate(a, teacher, n: int, out: Path) -> dict:
    return generate_pairs(teacher, out, n, solver=a.solver or PAIR_SOLVER, steps=a.steps or PAIR_STEPS, grid=a.grid,
                          labels=_labels_for(teacher, a.labels), guidance=a.guidance, shard_size=a.shard_size,
                          seed=a.seed, path=run_info(teacher).path, batch_size=a.pair_batch_size,
                          progress=not a.quiet)


def cmd_pairs(a) -> int:
    teacher = checkpoint.load(a.run, device=flags.device(a))
    m = _generate(a, teacher, a.n, Path(a.out))
    if _main_rank():
        print(f"{m['n']} pairs in {m['num_shards']} shard(s) at {a.out}: {m['solver']}, {m['steps']} steps, "
              f"NFE {m['nfe_per_pair']} per pair, {m['total_nfe']} in total")
    return 0


def pair_count_or_dir(s: str):
    """``--pairs``: a number of pairs to generate, or a pairs directory made by ``straightflow pairs``."""
    return int(s) if s.strip().isdigit() else s


def _existing_pairs(a, teacher, directory: str):
    """Pairs from ``straightflow pairs``, checked to come from this teacher and fit the given flags."""
    from ..straighten.pairs import teacher_fingerprint

    ds = load_pairs(directory)
    m = ds.info
    if (m.get("teacher") or {}).get("sha256") != teacher_fingerprint(teacher)["sha256"]:
        raise ValueError(f"{directory} holds pairs made by another teacher than {a.run}; generate them from this "
                         f"run (`straightflow pairs {a.run} --out DIR`) or pass a count (--pairs 8192)")
    given = {"--solver": (a.solver, m.get("solver")), "--steps": (a.steps, m.get("steps")),
             "--guidance": (a.guidance, m.get("guidance"))}
    bad = [f"{k} {v} (the pairs used {had})" for k, (v, had) in given.items() if v is not None and v != had]
    if bad:
        raise ValueError(f"{directory} was generated with other settings: {', '.join(bad)}; drop those flags to "
                         "use these pairs, or pass a count (--pairs N) to generate new ones")
    return m, ds


def cmd_reflow(a) -> int:
    owns = _maybe_init_dist()
    try:
        teacher = checkpoint.load(a.run, device=flags.device(a))
        teacher.run_config["run_dir"] = str(a.run)
        teacher_path = run_info(teacher).path
        out = Path(a.out)
        if isinstance(a.pairs, int):
            m = _generate(a, teacher, a.pairs, out / "pairs")
            ds = load_pairs(out / "pairs")
        else:
            m, ds = _existing_pairs(a, teacher, a.pairs)
        path = a.path or teacher_path
        anneal = None
        if a.anneal or a.anneal_steps:
            anneal = {"warmup": a.anneal_steps or max(1, a.train_steps // 2), "kind": a.anneal_kind}
        # the recipe's training settings: --steps here are the pair solver's, --train-steps the training's
        settings = flags.train_settings(a, steps=a.train_steps, ema_decay=default_ema(a.train_steps))
        res = reflow(teacher, ds, out=out, improved=a.improved, init=a.init, path=path, time_dist=a.time_dist,
                     loss=a.loss, anneal=anneal, settings=settings, desc="reflow",
                     allow_recipe_change=a.allow_recipe_change)
        if not _main_rank():
            return 0
        before = straightness_report(teacher, a.eval_n, a.eval_steps, a.seed, path=teacher_path,
                                     guidance=a.guidance)
        after = straightness_report(res.model, a.eval_n, a.eval_steps, a.seed, path=path)
        summary = {"pairs": {"n": m["n"], "solver": m["solver"], "steps": m["steps"],
                            "nfe_per_pair": m["nfe_per_pair"], "total_nfe": m["total_nfe"]},
                  "train_steps": a.train_steps, "final_loss": res.final_loss,
                  "before": before, "after": after}
        (out / "reflow_report.json").write_text(json.dumps(summary, indent=2) + "\n")
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


EVAL_NFES = (1, 2)


def _reference(source: Optional[str], n: int, fallback: Optional[Tensor]):
    """Held-out data for ``source`` (a data set name / file), else ``fallback`` (teacher samples)."""
    if source is not None:
        return report.reference_data(source, max(2 * n, 4)), f"held-out {source}"
    if fallback is None:
        raise ValueError("no reference data: pass --data NAME")
    return sfdata.Dataset(fallback, name="teacher"), "teacher samples (pass --data for real data)"


def _score(samples: Tensor, ref, seed: int, extractor: str) -> Tuple[str, float, float]:
    rep = metrics.evaluate(samples, ref.x, metric=report.default_metric(ref.x), seed=seed, extractor=extractor)
    return rep.name, rep.value, rep.floor


def eval_onestep(model: nn.Module, ref, nfes: Sequence[int] = EVAL_NFES, n: int = 1000, seed: int = 0,
                 mean: bool = False, extractor: str = "digits") -> List[Dict[str, Any]]:
    """Sample ``n`` points at each NFE (Euler, or :func:`~.meanflow.sample_mean` when ``mean``) from
    the same seeded noise (random labels if conditional) and score them against ``ref``."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(ref.x.shape[1:])
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    noise = torch.randn((n, *shape), generator=g).to(dev)
    k = getattr(model, "num_classes", None)
    cond = {"y": torch.randint(int(k), (n,), generator=g).to(dev)} if k else None
    rows = []
    for nfe in nfes:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = sample_mean(model, noise, steps=nfe, cond=cond) if mean else sample(model, noise, steps=nfe, cond=cond)
        secs = time.perf_counter() - t0
        name, value, floor = _score(out.x.cpu(), ref, seed, extractor)
        rows.append({"nfe": out.nfe, "metric": name, "value": value, "floor": floor,
                     "ratio": value / floor if floor > 0 else float("inf"), "seconds": secs})
    return rows


def rows_markdown(rows: Sequence[Dict[str, Any]], sampler: str) -> str:
    head = "| sampler | NFE | metric | value | data-vs-data floor | ratio |\n|---|---:|---|---:|---:|---:|\n"
    return head + "".join(f"| {sampler} | {r['nfe']} | {r['metric']} | {r['value']:.4g} | {r['floor']:.4g} | "
                          f"{r['ratio']:.2f}x |\n" for r in rows)


def _write_report(out: Path, title: str, lines: List[str]) -> str:
    md = "\n".join([f"# {title}", "", f"Machine: {machine_line()}", ""] + lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "onestep_report.md").write_text(md)
    return md


# ----------------------------------------------------------------------------- distill


def _is_pairs_dir(p: Path) -> bool:
    return (p / "manifest.json").is_file() or any(p.glob("shard-*.safetensors"))


def _student_config(base: Dict[str, Any], a) -> Tuple[Dict[str, Any], bool]:
    """The student's model config: ``base`` with the --student-* overrides; True if overridden."""
    cfg = dict(base)
    changed = False
    for key, val in (("hidden", a.student_hidden), ("depth", a.student_depth),
                     ("base_channels", a.student_base_channels)):
        if val is None:
            continue
        if key not in cfg and not (key == "base_channels" and cfg.get("name") == "unet"):
            raise ValueError(f"--student-{key.replace('_', '-')} does not apply to a {cfg.get('name')!r} model")
        cfg[key] = int(val)
        changed = True
    if cfg.get("name") == "unet" and a.student_base_channels is not None and cfg.get("time_dim") is not None:
        cfg["time_dim"] = None  # follow the (smaller) width
    return cfg, changed


def cmd_distill(a) -> int:
    src = Path(a.source)
    if not src.is_dir():
        raise ValueError(f"{src}: not found; expected a pairs directory (manifest.json) or a run directory (config.json)")
    out = Path(a.out)
    teacher_run = None
    if _is_pairs_dir(src):
        pairs_dir = src
        teacher_run = a.teacher
    elif (src / "config.json").is_file():
        teacher_run = str(src)
        pairs_dir = None
    else:
        raise ValueError(f"{src}: neither a pairs directory (manifest.json) nor a run directory (config.json)")
    dev = flags.device(a)
    teacher = checkpoint.load(teacher_run, device=dev) if teacher_run else None
    tinfo = run_info(teacher) if teacher is not None else None
    if a.perceptual > 0 and teacher is not None and len(getattr(teacher, "sample_shape", ())) != 3:
        raise ValueError(f"--perceptual compares classifier features of images; this teacher's samples have shape "
                         f"{tuple(teacher.sample_shape)}. Use --perceptual 0 for 2D/vector data")
    data_source = a.data or (tinfo.data_source if tinfo is not None else None)
    if pairs_dir is None:
        pairs_dir = out / "pairs"
        labels = "cycle" if getattr(teacher, "num_classes", None) else None
        if a.guidance is not None and labels is None:
            raise ValueError("--guidance needs a class-conditional teacher")
        print(f"[distill] generating {a.pairs} pairs with {a.solver} x {a.teacher_steps} steps into {pairs_dir}",
              flush=True)
        generate_pairs(teacher, pairs_dir, a.pairs, solver=a.solver, steps=a.teacher_steps, labels=labels,
                       guidance=a.guidance, seed=a.seed, path=tinfo.path,
                       progress=not a.quiet)
    pairs = load_pairs(pairs_dir)
    shape = tuple(pairs.x1.shape[1:])
    num_classes = getattr(teacher, "num_classes", None) if teacher is not None else pairs.num_classes
    if teacher is not None:
        base_cfg = dict(teacher.config)
    else:
        base_cfg = default_model_config(shape, num_classes)
    cfg, smaller = _student_config(base_cfg, a)
    student = build_model(cfg, seed=a.seed)
    kw = dict(batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema, seed=a.seed, warmup=a.warmup,
              ckpt_every=a.ckpt_every, device=str(dev), progress=not a.quiet, log=a.log, log_every=a.log_every,
              desc="distill",
              allow_recipe_change=a.allow_recipe_change)
    extra = {"data_source": data_source} if data_source else {}
    if smaller and teacher is not None and a.guide_weight > 0:
        method = f"SlimFlow flow-guided distillation (guide weight {a.guide_weight:g})"
        res = slimflow_distill(teacher, pairs, student, steps=a.steps, guide_weight=a.guide_weight, loss=a.loss,
                               perceptual=a.perceptual, out=out, extra_config=extra, **kw)
    else:
        init = teacher if (teacher is not None and not smaller) else None
        method = f"{a.k}-step distillation" + (" initialised from the teacher" if init is not None else "")
        res = distill(pairs, student, k=a.k, steps=a.steps, out=out, init=init, loss=a.loss,
                      perceptual=a.perceptual, extra_config=extra, **kw)
    ref, ref_name = _reference(data_source, a.n_eval, pairs.x1)
    rows = eval_onestep(res.model, ref, EVAL_NFES, n=a.n_eval, seed=a.seed, extractor=a.extractor)
    params = count_parameters(res.model)
    lines = [f"Student: {cfg['name']} with {params:,} parameters"
             + (f" (teacher: {count_parameters(teacher):,})" if teacher is not None else "")
             + f"; {method}; {res.steps} steps, final loss {res.final_loss:.4g}.",
             f"Pairs: {len(pairs)} from {pairs_dir} ({pairs.total_nfe:,} teacher NFE). Reference: {ref_name}.", "",
             rows_markdown(rows, "euler")]
    print(_write_report(out, f"Distilled student `{out}`", lines))
    return 0


# ----------------------------------------------------------------------------- meanflow


def cmd_meanflow(a) -> int:
    ds = sfdata.load_dataset(a.data, n=a.n, seed=a.seed, split="train")
    num_classes = ds.num_classes if (ds.y is not None and not a.unconditional) else None
    if not num_classes:
        ds = sfdata.Dataset(ds.x, name=ds.name)
    cfg = dict(default_model_config(ds.shape, num_classes, hidden=a.hidden, depth=a.depth,
                                    base_channels=a.base_channels), mean_flow=True, time_scale=a.time_scale)
    model = build_model(cfg, seed=a.seed)
    if a.init:
        init_from_velocity(model, checkpoint.load(a.init))
    if a.split:
        obj = SplitMeanFlow(model, time_dist=a.time_dist or "uniform", boundary_ratio=a.boundary_ratio)
    else:
        obj = MeanFlow(model, time_dist=a.time_dist, ratio=a.ratio, adaptive_p=a.adaptive_p)
    method = obj.name
    res = train(obj, ds, out=a.out, settings=flags.train_settings(a), desc="meanflow",
                allow_recipe_change=a.allow_recipe_change,
                extra_config={"data_source": a.data, "data_split": "train", "straighten": {"method": method}})
    ref, ref_name = _reference(a.data, a.n_eval, None)
    rows = eval_onestep(res.model, ref, EVAL_NFES, n=a.n_eval, seed=a.seed, mean=True, extractor=a.extractor)
    lines = [f"{'SplitMeanFlow' if a.split else 'MeanFlow'} on {a.data}: {cfg['name']}, {res.steps} steps, "
             f"final loss {res.final_loss:.4g}. Reference: {ref_name}.", "", rows_markdown(rows, "mean")]
    print(_write_report(Path(a.out), f"{method} run `{a.out}`", lines))
    return 0


def _train_args(p: argparse.ArgumentParser, steps: int) -> None:
    flags.add_train(p, steps=steps, schedule=False)
    p.add_argument("--n-eval", type=int, default=1000, help="samples scored at NFE 1 and 2")
    p.add_argument("--extractor", default="digits", help="classifier for the image metric: digits or mnist")


def register(sub) -> None:
    """``pairs``, ``reflow``, ``distill`` and ``meanflow``."""
    p = sub.add_parser("pairs", help="generate reflow (noise, sample) pairs from a run (resumable, torchrun-parallel)")
    p.add_argument("run", help="teacher run directory")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="pairs directory (rerun the same command to resume)")
    _add_pair_args(p)
    p.set_defaults(fn=cmd_pairs)

    r = sub.add_parser("reflow", help="k-rectified flow: generate pairs from RUN, train the next flow, report straightness")
    r.add_argument("run", help="teacher run directory (the (k-1)-RF)")
    r.add_argument("--pairs", type=pair_count_or_dir, default=8192,
                   help="a number of pairs to generate into OUT/pairs, or a pairs directory made from RUN by "
                   "`straightflow pairs`")
    r.add_argument("--out", required=True, help="output run directory (resumes if it holds a state)")
    _add_pair_args(r, reuse=True)
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
    r.add_argument("--allow-recipe-change", action="store_true",
                   help="resume OUT even though the recipe differs from the saved one")
    flags.add_log(r)
    r.add_argument("--eval-n", type=int, default=1024, help="trajectories for the straightness report")
    r.add_argument("--eval-steps", type=int, default=16, help="Euler steps for the straightness report")
    r.set_defaults(fn=cmd_reflow)

    d = sub.add_parser("distill", help="distil teacher pairs (or a teacher run) into a k-step / one-step student",
                       description="k-step distillation (Liu et al. 2022; InstaFlow) of stored teacher pairs; with "
                       "--student-hidden/--student-depth/--student-base-channels a smaller student trained with "
                       "SlimFlow's flow guidance when the teacher is known. Prints quality at NFE 1 and 2.")
    d.add_argument("source", help="a pairs directory (from generate_pairs / `straightflow pairs`) or a teacher run "
                   "directory (pairs are then generated into OUT/pairs, resumably)")
    d.add_argument("--out", required=True, help="student run directory (resumes if it holds a training state)")
    d.add_argument("--k", type=int, default=1, help="student Euler steps the distillation targets")
    d.add_argument("--loss", default="pseudo_huber", help=f"one of: {', '.join(loss_names())}")
    d.add_argument("--perceptual", type=float, default=0.0,
                   help="weight of the classifier-feature (perceptual) loss; images only")
    d.add_argument("--teacher", default=None, help="teacher run when SOURCE is a pairs directory (initialises the "
                   "student, guides a smaller one, names the data for evaluation)")
    d.add_argument("--student-hidden", type=int, default=None, help="smaller MLP student: hidden width")
    d.add_argument("--student-depth", type=int, default=None, help="smaller MLP student: residual blocks")
    d.add_argument("--student-base-channels", type=int, default=None, help="smaller UNet student: base channels")
    d.add_argument("--guide-weight", type=float, default=1.0,
                   help="SlimFlow flow-guidance weight for a smaller student (0: plain distillation). The "
                   "guidance target is the teacher's 2-step Euler output, so it needs a straight (reflowed) teacher: "
                   "with a curved 1-RF teacher it hurts (moons: W2 0.64 guided vs 0.24 unguided)")
    d.add_argument("--pairs", type=int, default=8192, help="pairs to generate when SOURCE is a run")
    d.add_argument("--solver", default="rk4", help=f"teacher solver for the pairs: {', '.join(solver_names())}")
    d.add_argument("--teacher-steps", type=int, default=32)
    d.add_argument("--guidance", type=float, default=None, help="classifier-free guidance for the teacher's pairs")
    d.add_argument("--data", default=None, help="reference data for evaluation (default: the teacher's data)")
    _train_args(d, 2000)
    d.set_defaults(fn=cmd_distill)

    m = sub.add_parser("meanflow", help="train a one-step MeanFlow / SplitMeanFlow model on a data set",
                       description="MeanFlow (Geng et al. 2025, JVP target) or, with --split, SplitMeanFlow (Guo et "
                       "al. 2025, interval splitting). Prints quality at NFE 1 and 2.")
    m.add_argument("--data", default="moons", help="a data set name or file (see `straightflow list`)")
    m.add_argument("--out", required=True)
    m.add_argument("--split", action="store_true", help="SplitMeanFlow instead of MeanFlow")
    m.add_argument("--n", type=int, default=None, help="number of points for 2D toys / subset size")
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--depth", type=int, default=4)
    m.add_argument("--base-channels", type=int, default=32)
    m.add_argument("--unconditional", action="store_true")
    m.add_argument("--time-scale", type=float, default=10.0,
                   help="times are multiplied by this before their sinusoidal features; MeanFlow's JVP "
                   "differentiates through them, and the usual 1000 makes d/dt u large and noisy")
    m.add_argument("--time-dist", default=None,
                   help=f"one of: {', '.join(time_names())} (default: MeanFlow logit-normal(0.4, 1) as in the "
                   "paper, SplitMeanFlow uniform)")
    m.add_argument("--ratio", type=float, default=0.25, help="MeanFlow: fraction of samples with r != t")
    m.add_argument("--adaptive-p", type=float, default=1.0, help="MeanFlow: adaptive loss weight power (0: MSE)")
    m.add_argument("--boundary-ratio", type=float, default=0.5, help="SplitMeanFlow: fraction trained at r = t")
    m.add_argument("--init", default=None, help="initialise from a trained velocity run of the same architecture")
    _train_args(m, 5000)
    m.set_defaults(fn=cmd_meanflow)
