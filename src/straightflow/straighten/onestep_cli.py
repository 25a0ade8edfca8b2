"""CLI for one-step models: ``straightflow distill`` and ``straightflow meanflow``.

``register(sub)`` adds both subcommands to the main parser's subparsers (called from
``straightflow.straighten.cli``). Each command trains, then prints quality at NFE 1 and 2
(exact W2 for vectors, classifier Fréchet distance for images, each beside its
data-vs-data floor) and writes it to ``OUT/onestep_report.md``.

Conditional straightening (InstaFlow with class labels) from the command line::

    straightflow reflow TEACHER --guidance 2 --pairs 8192 --out rf2   # the 2-RF learns the guided flow
    straightflow distill rf2 --out onestep --k 1                      # pairs from the 2-RF (labels cycle)

The student takes ``y`` and samples in one step without guidance (library:
:func:`straightflow.straighten.distill.conditional_onestep`). ``straightflow distill TEACHER
--guidance W`` distils the guided teacher directly, skipping the 2-RF.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

EVAL_NFES = (1, 2)


# ----------------------------------------------------------------------------- evaluation


def _reference(source: Optional[str], n: int, fallback: Optional[Tensor]):
    """Held-out data for ``source`` (a data set name / file), else ``fallback`` (teacher samples)."""
    from .. import data as sfdata
    from .. import report

    if source is not None:
        return report.reference_data(source, max(2 * n, 4)), f"held-out {source}"
    if fallback is None:
        raise ValueError("no reference data: pass --data NAME")
    return sfdata.Dataset(fallback, name="teacher"), "teacher samples (pass --data for real data)"


def _score(samples: Tensor, ref, seed: int, extractor: str) -> Tuple[str, float, float]:
    from .. import metrics, report

    rep = metrics.evaluate(samples, ref.x, metric=report.default_metric(ref.x), seed=seed, extractor=extractor)
    return rep.name, rep.value, rep.floor


def eval_onestep(model: nn.Module, ref, nfes: Sequence[int] = EVAL_NFES, n: int = 1000, seed: int = 0,
                 mean: bool = False, extractor: str = "digits") -> List[Dict[str, Any]]:
    """Sample ``n`` points at each NFE (Euler, or :func:`~.meanflow.sample_mean` when ``mean``) from
    the same seeded noise (random labels if conditional) and score them against ``ref``."""
    from ..solvers import sample
    from .meanflow import sample_mean

    g = torch.Generator().manual_seed(seed)
    shape = tuple(ref.x.shape[1:])
    noise = torch.randn((n, *shape), generator=g)
    k = getattr(model, "num_classes", None)
    cond = {"y": torch.randint(int(k), (n,), generator=g)} if k else None
    rows = []
    for nfe in nfes:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = sample_mean(model, noise, steps=nfe, cond=cond) if mean else sample(model, noise, steps=nfe, cond=cond)
        secs = time.perf_counter() - t0
        name, value, floor = _score(out.x, ref, seed, extractor)
        rows.append({"nfe": out.nfe, "metric": name, "value": value, "floor": floor,
                     "ratio": value / floor if floor > 0 else float("inf"), "seconds": secs})
    return rows


def rows_markdown(rows: Sequence[Dict[str, Any]], sampler: str) -> str:
    head = "| sampler | NFE | metric | value | data-vs-data floor | ratio |\n|---|---:|---|---:|---:|---:|\n"
    return head + "".join(f"| {sampler} | {r['nfe']} | {r['metric']} | {r['value']:.4g} | {r['floor']:.4g} | "
                          f"{r['ratio']:.2f}x |\n" for r in rows)


def _write_report(out: Path, title: str, lines: List[str]) -> str:
    from ..cli import machine_line

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
    from .. import checkpoint
    from ..cli import default_model_config
    from ..models import build_model, count_parameters
    from .distill import distill, slimflow_distill
    from .pairs import generate_pairs, load_pairs

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
    teacher = checkpoint.load(teacher_run) if teacher_run else None
    tcfg = teacher.run_config if teacher is not None else {}
    if a.perceptual > 0 and teacher is not None and len(getattr(teacher, "sample_shape", ())) != 3:
        raise ValueError(f"--perceptual compares classifier features of images; this teacher's samples have shape "
                         f"{tuple(teacher.sample_shape)}. Use --perceptual 0 for 2D/vector data")
    data_source = a.data or tcfg.get("data_source")
    if pairs_dir is None:
        pairs_dir = out / "pairs"
        labels = "cycle" if getattr(teacher, "num_classes", None) else None
        if a.guidance is not None and labels is None:
            raise ValueError("--guidance needs a class-conditional teacher")
        print(f"[distill] generating {a.pairs} pairs with {a.solver} x {a.teacher_steps} steps into {pairs_dir}",
              flush=True)
        generate_pairs(teacher, pairs_dir, a.pairs, solver=a.solver, steps=a.teacher_steps, labels=labels,
                       guidance=a.guidance, seed=a.seed, path=tcfg.get("flow", {}).get("path", "linear"),
                       progress=not a.quiet)
    pairs = load_pairs(pairs_dir)
    shape = tuple(pairs.x1.shape[1:])
    num_classes = getattr(teacher, "num_classes", None) if teacher is not None else pairs.num_classes
    if teacher is not None:
        base_cfg = dict(teacher.config)
    else:
        ns = argparse.Namespace(hidden=256, depth=4, base_channels=32)
        base_cfg = default_model_config(shape, num_classes, ns)
    cfg, smaller = _student_config(base_cfg, a)
    student = build_model(cfg)
    kw = dict(batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema, seed=a.seed, warmup=a.warmup,
              ckpt_every=a.ckpt_every, progress=not a.quiet)
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
    from .. import data as sfdata
    from ..cli import default_model_config
    from ..models import build_model
    from ..train import train
    from .meanflow import MeanFlow, SplitMeanFlow, init_from_velocity

    ds = sfdata.load_dataset(a.data, n=a.n, seed=a.seed)
    num_classes = ds.num_classes if (ds.y is not None and not a.unconditional) else None
    if not num_classes:
        ds = sfdata.Dataset(ds.x, name=ds.name)
    ns = argparse.Namespace(hidden=a.hidden, depth=a.depth, base_channels=a.base_channels)
    cfg = dict(default_model_config(ds.shape, num_classes, ns), mean_flow=True, time_scale=a.time_scale)
    model = build_model(cfg)
    if a.init:
        from .. import checkpoint

        init_from_velocity(model, checkpoint.load(a.init))
    if a.split:
        obj = SplitMeanFlow(model, time_dist=a.time_dist or "uniform", boundary_ratio=a.boundary_ratio)
    else:
        obj = MeanFlow(model, time_dist=a.time_dist, ratio=a.ratio, adaptive_p=a.adaptive_p)
    method = obj.name
    res = train(obj, ds, steps=a.steps, out=a.out, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                ema_decay=a.ema, seed=a.seed, ckpt_every=a.ckpt_every, progress=not a.quiet,
                extra_config={"data_source": a.data, "straighten": {"method": method}})
    ref, ref_name = _reference(a.data, a.n_eval, None)
    rows = eval_onestep(res.model, ref, EVAL_NFES, n=a.n_eval, seed=a.seed, mean=True, extractor=a.extractor)
    lines = [f"{'SplitMeanFlow' if a.split else 'MeanFlow'} on {a.data}: {cfg['name']}, {res.steps} steps, "
             f"final loss {res.final_loss:.4g}. Reference: {ref_name}.", "", rows_markdown(rows, "mean")]
    print(_write_report(Path(a.out), f"{method} run `{a.out}`", lines))
    return 0


# ----------------------------------------------------------------------------- parser


def _train_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=1000, help="samples scored at NFE 1 and 2")
    p.add_argument("--extractor", default="digits", help="classifier for the image metric: digits or mnist")
    p.add_argument("--quiet", action="store_true")


def register(sub) -> None:
    """Add ``distill`` and ``meanflow`` to the ``straightflow`` command's subparsers."""
    from ..losses import available as loss_names
    from ..solvers import available as solver_names
    from ..time import available as time_names

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
