"""``straightflow bench straighten``: straightening and compressing flows, method by method.

For each data set (2D: ``moons`` = N(0, I) -> moons, ``8g-moons`` = 8 gaussians -> moons (a
non-Gaussian source, trained from stored source/data draws re-paired at random in every batch),
``checkerboard``; images: ``digits`` 8x8, flattened to 64-D vectors) and each method it trains
the model(s), then scores samples at NFE 1, 2, 4 and 100 against held-out data with the
data-vs-data floor (exact W2 for 2D, the project classifier's Fréchet distance for digits),
the straightness of the NFE-100 trajectories (Liu et al. 2022) and the total cost: velocity
evaluations spent generating pairs plus training rows (steps x batch), summed over every stage
the method depends on (e.g. distilled 2-RF = 1-RF training + 1-RF pairs + 2-RF training + 2-RF
pairs + distillation). Seeds give mean ± std.

Methods: 1-RF, OT-CFM (minibatch exact OT coupling), W-CFM (Gibbs-weighted CFM), blockwise FM
(one network per time segment), 2-RF, 2-RF with the improved techniques (U-shaped t,
pseudo-Huber with 1/t weighting, init from 1-RF, re-noise sampler) and ablation rows (each
technique alone; "from scratch" drops the 1-RF initialisation), distilled 2-RF (k = 1),
SlimFlow student (annealing reflow into a smaller net + flow-guided distillation), MeanFlow,
SplitMeanFlow, and for digits a class-conditional distilled model (guided teacher pairs).

Every trained stage lives in ``<out>/runs/<dataset>/<stage>/seed<k>`` (a normal run directory
that the trainer resumes) with a ``stage.json`` when finished; every evaluated row writes
``result.json`` in ``<out>/runs/<dataset>/<row>/seed<k>``. A rerun skips what is finished, so an
interrupted benchmark continues. A method whose module cannot be imported is listed as not
available with the ImportError; a method that fails is listed with its error.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from straightflow import data as sfdata, metrics
from straightflow.checkpoint import load as load_run, load_config, load_weights
from straightflow.coupling import Coupling, PairDataset
from straightflow.flow import Flow
from straightflow.io import load_json, load_tensors, save_json, save_tensors
from straightflow.models import MLP
from straightflow.plotting import pyplot, save_image_panels, save_scatter_panels, series_style
from straightflow.solvers import sample
from straightflow.system import machine_line
from straightflow.train import train
from .harness import Report, Timing, register_suite, run_suite

__all__ = ["main", "run_bench", "Settings", "DATASETS", "METHODS"]

NFES = (1, 2, 4, 100)
DATASETS = ("moons", "8g-moons", "checkerboard", "digits", "mnist")


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Budget of one (data set, seed); see ``SETTINGS`` for the defaults."""

    n_train: int
    hidden: int
    depth: int
    batch: int
    lr: float
    base_steps: int      # 1-RF, OT-CFM, W-CFM, blockwise, MeanFlow, SplitMeanFlow, conditional teacher
    reflow_steps: int    # every 2-RF variant, SlimFlow annealing reflow
    distill_steps: int   # k=1 distillation, SlimFlow flow-guided distillation
    n_pairs: int
    pair_steps: int      # RK4 steps per pair (4 NFE each)
    n_eval: int
    n_ref: int           # held-out reference (split in two halves: reference and floor)
    wcfm_epsilon: float
    num_blocks: int
    slim_hidden: int
    guidance: float
    ckpt_every: int


SETTINGS: Dict[Tuple[str, bool], Settings] = {
    ("2d", False): Settings(n_train=20000, hidden=128, depth=3, batch=256, lr=2e-3, base_steps=1200, reflow_steps=600,
                            distill_steps=400, n_pairs=6000, pair_steps=25, n_eval=1000, n_ref=2000,
                            wcfm_epsilon=10.0, num_blocks=2, slim_hidden=64, guidance=2.0, ckpt_every=300),
    # digits: a 64-D noise -> image map needs more pairs and longer distillation than 2D (4000 pairs and
    # 400 steps left the one-step student at 1.5x the 1-RF's 100-step FD; 16000 and 3000: 1.08x, seed 0)
    ("digits", False): Settings(n_train=1797, hidden=256, depth=3, batch=128, lr=1e-3, base_steps=1500,
                                reflow_steps=600, distill_steps=3000, n_pairs=16000, pair_steps=25, n_eval=898,
                                n_ref=1796, wcfm_epsilon=1.0, num_blocks=2, slim_hidden=128, guidance=2.0,
                                ckpt_every=300),
    # MNIST (from ../shared/data when present): 784-D vectors, an MLP like the other sets, 8000 training
    # images and 2000 held-out ones (reference and floor halves)
    ("mnist", False): Settings(n_train=8000, hidden=512, depth=3, batch=128, lr=1e-3, base_steps=2000,
                               reflow_steps=800, distill_steps=2000, n_pairs=8000, pair_steps=25, n_eval=1000,
                               n_ref=2000, wcfm_epsilon=1.0, num_blocks=2, slim_hidden=256, guidance=2.0,
                               ckpt_every=400),
    ("mnist", True): Settings(n_train=512, hidden=32, depth=1, batch=64, lr=3e-3, base_steps=30, reflow_steps=15,
                              distill_steps=10, n_pairs=128, pair_steps=2, n_eval=100, n_ref=200,
                              wcfm_epsilon=1.0, num_blocks=2, slim_hidden=16, guidance=2.0, ckpt_every=0),
    ("2d", True): Settings(n_train=2000, hidden=32, depth=1, batch=128, lr=3e-3, base_steps=60, reflow_steps=30,
                           distill_steps=20, n_pairs=256, pair_steps=3, n_eval=200, n_ref=400,
                           wcfm_epsilon=1.0, num_blocks=2, slim_hidden=16, guidance=2.0, ckpt_every=0),
    ("digits", True): Settings(n_train=1797, hidden=32, depth=1, batch=64, lr=3e-3, base_steps=40, reflow_steps=20,
                               distill_steps=15, n_pairs=200, pair_steps=3, n_eval=200, n_ref=1796,
                               wcfm_epsilon=0.2, num_blocks=2, slim_hidden=16, guidance=2.0, ckpt_every=0),
}


# ----------------------------------------------------------------------------- tasks


class _Reshuffle(Coupling):
    """Independent coupling for stored source draws: the batch's source rows are permuted at random
    (so each data point meets a fresh source point every epoch)."""

    name = "reshuffle"

    def __call__(self, x0, x1, generator=None):
        perm = torch.randperm(x0.shape[0], generator=generator, device="cpu").to(x0.device)
        return x0[perm], x1, torch.arange(x1.shape[0], device=x1.device)


@dataclass
class Task:
    name: str
    kind: str                       # "2d" or "digits"
    x: Tensor                       # training data (N, D)
    y: Optional[Tensor]             # labels (digits)
    source: Optional[str]           # None = N(0, I), else a toy_2d name
    ref_a: Tensor
    ref_b: Tensor
    metric: str                     # "W2" or "FD"
    description: str
    side: int = 8                   # image side (digits 8, MNIST 28)
    extractor: str = "digits"       # classifier-FD feature extractor

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def draw_source(self, n: int, seed: int) -> Tensor:
        if self.source is None:
            return torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed))
        return sfdata.toy_2d(self.source, n, seed=seed)

    def train_data(self, seed: int) -> Any:
        """Training data for source -> data objectives (a PairDataset for a non-Gaussian source)."""
        if self.source is None:
            return self.x
        return PairDataset(self.draw_source(self.x.shape[0], 7919 + seed), self.x, name=f"{self.source}->{self.name}")

    def coupling(self, base: str = "independent") -> Any:
        return _Reshuffle() if (self.source is not None and base == "independent") else base

    def quality(self, samples: Tensor) -> float:
        if self.metric == "W2":
            return metrics.w2(samples, self.ref_a, max_n=None)
        k = self.side
        return metrics.classifier_fd(samples.reshape(-1, 1, k, k).clamp(-1, 1), self.ref_a.reshape(-1, 1, k, k),
                                     extractor=self.extractor)

    def floor(self) -> float:
        if self.metric == "W2":
            return metrics.w2(self.ref_a, self.ref_b, max_n=None)
        k = self.side
        return metrics.classifier_fd(self.ref_a.reshape(-1, 1, k, k), self.ref_b.reshape(-1, 1, k, k),
                                     extractor=self.extractor)


def make_task(name: str, S: Settings) -> Task:
    if name in ("moons", "checkerboard", "8g-moons"):
        target = "moons" if name == "8g-moons" else name
        # two independent held-out draws (seeds the training never uses): reference and floor
        ref_a = sfdata.toy_2d(target, S.n_ref // 2, seed=12345)
        ref_b = sfdata.toy_2d(target, S.n_ref // 2, seed=54321)
        desc = "8 gaussians -> moons (non-Gaussian source)" if name == "8g-moons" else f"N(0, I) -> {name}"
        return Task(name, "2d", sfdata.toy_2d(target, S.n_train, seed=0), None,
                    "8gaussians" if name == "8g-moons" else None, ref_a, ref_b, "W2", desc)
    if name == "digits":
        ds = sfdata.digits()
        x = ds.x.reshape(ds.x.shape[0], -1)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(12345))
        half = x.shape[0] // 2
        return Task(name, "digits", x, ds.y, None, x[perm[:half]], x[perm[half:2 * half]], "FD",
                    "N(0, I) -> digits 8x8 (64-D vectors; FD in the project classifier's features, "
                    "reference = the data set itself, floor = half vs half)")
    if name == "mnist":
        ds = sfdata.mnist()  # raises FileNotFoundError with the places it looked
        x = ds.x.reshape(ds.x.shape[0], -1)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(12345))
        train_x, held = x[perm[:S.n_train]], x[perm[S.n_train:S.n_train + S.n_ref]]
        half = held.shape[0] // 2
        return Task(name, "mnist", train_x, None, None, held[:half], held[half:2 * half], "FD",
                    f"N(0, I) -> MNIST 28x28 (784-D vectors; {train_x.shape[0]} training images, FD in the 'mnist' "
                    "extractor's features against held-out images, floor = held-out half vs half)",
                    side=28, extractor="mnist")
    raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- runner


@dataclass
class Stage:
    model: Any
    cost: Dict[str, int]            # cumulative {"pair_nfe", "train_rows"}
    extra: Dict[str, Any] = field(default_factory=dict)


def _cost(*parts: Dict[str, int], pair_nfe: int = 0, train_rows: int = 0) -> Dict[str, int]:
    c = {"pair_nfe": int(pair_nfe), "train_rows": int(train_rows)}
    for p in parts:
        c["pair_nfe"] += int(p.get("pair_nfe", 0))
        c["train_rows"] += int(p.get("train_rows", 0))
    return c


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _load_model(d: Path) -> nn.Module:
    cfg = load_config(d)
    if cfg["model"]["name"] == "blockwise":
        from straightflow.models.blockwise import BlockwiseFlow

        m = BlockwiseFlow(**{k: v for k, v in cfg["model"].items() if k != "name"})
        load_weights(m, d / "model.safetensors")
        return m.eval()
    return load_run(d)


class Runner:
    """Trains (or reloads) the stages of one (data set, seed) and evaluates rows, with caching."""

    def __init__(self, task: Task, S: Settings, seed: int, root: Path, log: Callable[[str], None]) -> None:
        self.task, self.S, self.seed, self.log = task, S, seed, log
        self.root = root / "runs" / task.name
        self.memo: Dict[str, Stage] = {}

    def dir(self, key: str) -> Path:
        return self.root / _slug(key) / f"seed{self.seed}"

    def train_kw(self, steps: int) -> Dict[str, Any]:
        S = self.S
        return dict(batch_size=S.batch, lr=S.lr, warmup=min(50, steps // 10), lr_schedule="cosine",
                    ema_decay=max(0.0, min(0.999, 1.0 - 20.0 / steps)), ckpt_every=S.ckpt_every, seed=self.seed,
                    progress=False)

    def stage(self, key: str, build: Callable[[Path], Stage]) -> Stage:
        if key in self.memo:
            return self.memo[key]
        d = self.dir(key)
        done = d / "stage.json"
        if done.is_file():
            info = load_json(done)
            model = _load_pairs(d) if info.get("kind") == "pairs" else _load_model(d)
            st = Stage(model, info["cost"], info.get("extra", {}))
        else:
            t0 = time.perf_counter()
            st = build(d)
            kind = "pairs" if isinstance(st.model, PairDataset) else "model"
            d.mkdir(parents=True, exist_ok=True)
            save_json(done, {"kind": kind, "cost": st.cost, "extra": st.extra, "seconds": time.perf_counter() - t0})
            self.log(f"    stage {key}: {time.perf_counter() - t0:.1f} s")
        self.memo[key] = st
        return st

    # -- generic pieces ------------------------------------------------------
    def mlp(self, hidden: Optional[int] = None, num_classes: Optional[int] = None, **kw: Any) -> nn.Module:
        torch.manual_seed(self.seed)
        return MLP(dim=self.task.dim, hidden=hidden or self.S.hidden, depth=self.S.depth, num_classes=num_classes, **kw)

    def fit(self, obj: Any, d: Path, steps: int, data: Any = None) -> Stage:
        data = self.task.train_data(self.seed) if data is None else data
        res = train(obj, data, steps, out=d, **self.train_kw(steps))
        return Stage(res.model, _cost(train_rows=steps * self.S.batch))

    def pairs(self, key: str, teacher_key: str, labels: Any = None, guidance: Optional[float] = None) -> Stage:
        def build(d: Path) -> Stage:
            teacher = self.get(teacher_key)
            S = self.S
            if self.task.source is None:
                from straightflow.straighten.pairs import generate_pairs

                man = generate_pairs(teacher.model, d, S.n_pairs, shape=(self.task.dim,), solver="rk4",
                                     steps=S.pair_steps, labels=labels, guidance=guidance, seed=104729 + self.seed,
                                     progress=False)
                ds = _load_pairs(d)
                nfe = int(man["total_nfe"])
            else:  # non-Gaussian source: integrate from stored source draws
                x0 = self.task.draw_source(S.n_pairs, 104729 + self.seed)
                with torch.no_grad():
                    r = sample(teacher.model, x0, solver="rk4", steps=S.pair_steps)
                ds = PairDataset(x0, r.x.float(), name=f"pairs:{teacher_key}")
                nfe = int(r.nfe) * S.n_pairs
                d.mkdir(parents=True, exist_ok=True)
                save_tensors(d / "pairs.safetensors", {"x0": ds.x0.contiguous(), "x1": ds.x1.contiguous()},
                             metadata={"total_nfe": str(nfe)})
            return Stage(ds, _cost(teacher.cost, pair_nfe=nfe))

        return self.stage(key, build)

    # -- stages ---------------------------------------------------------------
    def get(self, key: str) -> Stage:
        return self.stage(key, lambda d: BUILDERS[key](self, d))

    # -- evaluation -----------------------------------------------------------
    def evaluate(self, row: str, stage_key: str, sampler: str, cond_labels: bool = False) -> Dict[str, Any]:
        d = self.dir(row)
        res_file = d / "result.json"
        if res_file.is_file():
            return load_json(res_file)
        st = self.get(stage_key)
        model = st.model
        n = self.S.n_eval
        noise = self.task.draw_source(n, 424242 + self.seed)
        cond = {"y": torch.arange(n) % 10} if cond_labels else None
        out: Dict[str, Any] = {"quality": {}, "cost": st.cost, "sampler": sampler}
        keep = None
        with torch.no_grad():
            for nfe in NFES:
                r = _draw(model, noise, nfe, sampler, cond, trajectory=(nfe == max(NFES)))
                if r.nfe != nfe:
                    raise RuntimeError(f"{row}: sampler spent {r.nfe} NFE for a budget of {nfe}")
                out["quality"][str(nfe)] = self.task.quality(r.x)
                if nfe == 1:
                    keep = r.x
                if r.trajectory is not None:
                    out["straightness"] = metrics.straightness(r.trajectory, r.times)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / "samples_nfe1.safetensors", {"x": keep.float().contiguous()})
        save_json(res_file, out)
        return out


def _load_pairs(d: Path) -> PairDataset:
    f = d / "pairs.safetensors"
    if f.is_file():
        t = load_tensors(f)
        ds = PairDataset(t["x0"], t["x1"], name="pairs")
        return ds
    from straightflow.straighten.pairs import load_pairs

    return load_pairs(d)


def _draw(model: Any, noise: Tensor, nfe: int, sampler: str, cond: Optional[Dict[str, Tensor]], trajectory: bool):
    if sampler == "euler":
        return sample(model, noise, solver="euler", steps=nfe, cond=cond, return_trajectory=trajectory)
    if sampler == "renoise":
        from straightflow.straighten.reflow import sample_renoise

        return sample_renoise(model, noise, nfe, cond=cond, return_trajectory=trajectory)
    if sampler == "mean":
        from straightflow.straighten.meanflow import sample_mean

        return sample_mean(model, noise, steps=nfe, cond=cond, return_trajectory=trajectory)
    raise ValueError(f"unknown sampler {sampler!r}")


# ----------------------------------------------------------------------------- stage builders


def _b_1rf(r: Runner, d: Path) -> Stage:
    return r.fit(Flow(r.mlp(), coupling=r.task.coupling()), d, r.S.base_steps)


def _b_ot(r: Runner, d: Path) -> Stage:
    return r.fit(Flow(r.mlp(), coupling="ot"), d, r.S.base_steps)


def _b_wcfm(r: Runner, d: Path) -> Stage:
    from straightflow.straighten.wcfm import WeightedCFM

    return r.fit(WeightedCFM(r.mlp(), epsilon=r.S.wcfm_epsilon, coupling=r.task.coupling()), d, r.S.base_steps)


def _b_block(r: Runner, d: Path) -> Stage:
    from straightflow.models.blockwise import BlockwiseFlow

    torch.manual_seed(r.seed)
    m = BlockwiseFlow({"name": "mlp", "dim": r.task.dim, "hidden": r.S.hidden, "depth": r.S.depth},
                      num_blocks=r.S.num_blocks)
    return r.fit(Flow(m, coupling=r.task.coupling()), d, r.S.base_steps)


def _b_meanflow(r: Runner, d: Path, split: bool = False) -> Stage:
    from straightflow.straighten.meanflow import MeanFlow, SplitMeanFlow

    # time_scale 10: the average-velocity targets differentiate (MeanFlow) or difference (SplitMeanFlow)
    # across times, which the usual scale-1000 sinusoidal features make needlessly steep; MeanFlow
    # samples (t, r) from the paper's logit-normal (its default)
    m = r.mlp(mean_flow=True, time_scale=10.0)
    obj = SplitMeanFlow(m, coupling=r.task.coupling()) if split else MeanFlow(m, coupling=r.task.coupling())
    return r.fit(obj, d, r.S.base_steps)


def _reflow_stage(r: Runner, d: Path, **kw: Any) -> Stage:
    from straightflow.straighten.reflow import reflow

    teacher = r.get("1-RF")
    pairs = r.pairs("pairs 1-RF", "1-RF")
    steps = r.S.reflow_steps
    tk = r.train_kw(steps)
    res = reflow(teacher.model, pairs.model, steps, out=d, path="linear", **tk, **kw)
    return Stage(res.model, _cost(pairs.cost, train_rows=steps * r.S.batch))


def _b_2rf_improved(r: Runner, d: Path) -> Stage:
    return _reflow_stage(r, d, improved=True)


def _b_2rf_u(r: Runner, d: Path) -> Stage:
    from straightflow.straighten.reflow import IMPROVED_TIME_DIST

    return _reflow_stage(r, d, time_dist=IMPROVED_TIME_DIST)


def _b_2rf_huber(r: Runner, d: Path) -> Stage:
    from straightflow.straighten.reflow import IMPROVED_LOSS

    return _reflow_stage(r, d, loss=IMPROVED_LOSS)


def _b_distill(r: Runner, d: Path) -> Stage:
    from straightflow.straighten.distill import distill

    # the teacher is the 2-RF variant that keeps the 1-RF's quality best at many steps (U-shaped t):
    # a k = 1 student reproduces its teacher's endpoint map, so the teacher's NFE-100 quality is its ceiling
    rf2 = r.get("2-RF +U-shaped t")
    pairs = r.pairs("pairs 2-RF +U-shaped t", "2-RF +U-shaped t")
    steps = r.S.distill_steps
    res = distill(pairs.model, init=rf2.model, k=1, steps=steps, out=d, **r.train_kw(steps))
    return Stage(res.model, _cost(rf2.cost, pairs.cost, train_rows=steps * r.S.batch))


def _b_distill_1rf(r: Runner, d: Path) -> Stage:
    """k = 1 distillation straight from the 1-RF's pairs (no reflow): the student learns the 1-RF's
    own noise -> data map, so its ceiling is the 1-RF's many-step quality rather than the 2-RF's."""
    from straightflow.straighten.distill import distill

    rf1 = r.get("1-RF")
    pairs = r.pairs("pairs 1-RF", "1-RF")
    steps = r.S.distill_steps
    res = distill(pairs.model, init=rf1.model, k=1, steps=steps, out=d, **r.train_kw(steps))
    return Stage(res.model, _cost(pairs.cost, train_rows=steps * r.S.batch))


def _b_slim_reflow(r: Runner, d: Path) -> Stage:
    if r.task.source is not None:
        raise NotApplicable("SlimFlow's annealing and flow guidance draw fresh N(0, I) noise; this source is not Gaussian")
    small = {"name": "mlp", "dim": r.task.dim, "hidden": r.S.slim_hidden, "depth": r.S.depth}
    return _reflow_stage(r, d, init=small, anneal=True)


def _b_slim(r: Runner, d: Path) -> Stage:
    from straightflow.straighten.distill import slimflow_distill

    small = r.get("SlimFlow annealed 2-RF")
    pairs = r.pairs("pairs SlimFlow 2-RF", "SlimFlow annealed 2-RF")
    steps = r.S.distill_steps
    student = copy.deepcopy(small.model).train().requires_grad_(True)
    res = slimflow_distill(small.model, pairs.model, student, steps=steps, out=d, **r.train_kw(steps))
    # each step also runs the teacher twice on a fresh batch: count those evaluations as pair NFE
    return Stage(res.model, _cost(small.cost, pairs.cost, pair_nfe=2 * steps * r.S.batch,
                                  train_rows=steps * r.S.batch))


def _b_cond_teacher(r: Runner, d: Path) -> Stage:
    if r.task.y is None:
        raise NotApplicable("needs class labels; this data set has none (the shipped MNIST split is unlabelled)")
    data = sfdata.Dataset(r.task.x, y=r.task.y, num_classes=10, name="digits")
    return r.fit(Flow(r.mlp(num_classes=10), cond_dropout=0.1), d, r.S.base_steps, data=data)


def _b_cond_reflow(r: Runner, d: Path) -> Stage:
    from straightflow.straighten.reflow import reflow

    teacher = r.get("conditional teacher")
    pairs = r.pairs("pairs conditional CFG", "conditional teacher", labels="cycle", guidance=r.S.guidance)
    steps = r.S.reflow_steps
    res = reflow(teacher.model, pairs.model, steps, out=d, path="linear", improved=True, **r.train_kw(steps))
    return Stage(res.model, _cost(pairs.cost, train_rows=steps * r.S.batch))


def _b_cond_distill(r: Runner, d: Path) -> Stage:
    from straightflow.straighten.distill import distill

    rf2 = r.get("conditional 2-RF")
    pairs = r.pairs("pairs conditional 2-RF", "conditional 2-RF", labels="cycle")
    steps = r.S.distill_steps
    res = distill(pairs.model, init=rf2.model, k=1, steps=steps, out=d, **r.train_kw(steps))
    return Stage(res.model, _cost(rf2.cost, pairs.cost, train_rows=steps * r.S.batch))


class NotApplicable(Exception):
    """The method does not apply to this data set (reported as such, not as a failure)."""


BUILDERS: Dict[str, Callable[[Runner, Path], Stage]] = {
    "1-RF": _b_1rf,
    "OT-CFM": _b_ot,
    "W-CFM": _b_wcfm,
    "Blockwise FM": _b_block,
    "MeanFlow": lambda r, d: _b_meanflow(r, d, split=False),
    "SplitMeanFlow": lambda r, d: _b_meanflow(r, d, split=True),
    "2-RF": lambda r, d: _reflow_stage(r, d),
    "2-RF improved": _b_2rf_improved,
    "2-RF +U-shaped t": _b_2rf_u,
    "2-RF +pseudo-Huber 1/t": _b_2rf_huber,
    "2-RF from scratch": lambda r, d: _reflow_stage(r, d, init="scratch"),
    "distilled 2-RF": _b_distill,
    "distilled 1-RF": _b_distill_1rf,
    "SlimFlow annealed 2-RF": _b_slim_reflow,
    "SlimFlow student": _b_slim,
    "conditional teacher": _b_cond_teacher,
    "conditional 2-RF": _b_cond_reflow,
    "conditional distilled": _b_cond_distill,
}

# (row name, stage, sampler, module that must import, digits only, note)
METHODS: List[Tuple[str, str, str, str, bool, str]] = [
    ("1-RF", "1-RF", "euler", "straightflow.flow", False, "independent coupling, Euler"),
    ("OT-CFM", "OT-CFM", "euler", "straightflow.coupling", False, "minibatch exact OT coupling"),
    ("W-CFM", "W-CFM", "euler", "straightflow.straighten.wcfm", False, "Gibbs-weighted CFM"),
    ("Blockwise FM", "Blockwise FM", "euler", "straightflow.models.blockwise", False, "one MLP per time segment"),
    ("2-RF", "2-RF", "euler", "straightflow.straighten.reflow", False, "init 1-RF, uniform t, MSE"),
    ("2-RF improved + re-noise", "2-RF improved", "renoise", "straightflow.straighten.reflow", False,
     "all techniques: U-shaped t, pseudo-Huber 1/t, init 1-RF, re-noise sampler"),
    ("2-RF improved (Euler)", "2-RF improved", "euler", "straightflow.straighten.reflow", False,
     "ablation: all but the re-noise sampler"),
    ("2-RF +U-shaped t", "2-RF +U-shaped t", "euler", "straightflow.straighten.reflow", False, "ablation"),
    ("2-RF +pseudo-Huber 1/t", "2-RF +pseudo-Huber 1/t", "euler", "straightflow.straighten.reflow", False, "ablation"),
    ("2-RF +re-noise sampler", "2-RF", "renoise", "straightflow.straighten.reflow", False, "ablation"),
    ("2-RF from scratch", "2-RF from scratch", "euler", "straightflow.straighten.reflow", False,
     "ablation: no 1-RF initialisation"),
    ("distilled 2-RF (k=1)", "distilled 2-RF", "euler", "straightflow.straighten.distill", False,
     "from 2-RF +U-shaped t (its RK4 pairs), pseudo-Huber"),
    ("distilled 1-RF (k=1)", "distilled 1-RF", "euler", "straightflow.straighten.distill", False,
     "from the 1-RF's RK4 pairs, no reflow, pseudo-Huber"),
    ("SlimFlow student", "SlimFlow student", "euler", "straightflow.straighten.distill", False,
     "smaller net: annealing reflow + flow-guided distillation"),
    ("MeanFlow", "MeanFlow", "mean", "straightflow.straighten.meanflow", False,
     "JVP target, logit-normal(0.4, 1) times, time scale 10"),
    ("SplitMeanFlow", "SplitMeanFlow", "mean", "straightflow.straighten.meanflow", False,
     "interval splitting, time scale 10"),
    ("conditional distilled", "conditional distilled", "euler", "straightflow.straighten.distill", True,
     "CFG teacher pairs -> conditional 2-RF (improved) -> k=1"),
]

# training steps of each stage, as multiples of (base, reflow, distill) and relative step cost (for the estimate)
_STAGE_STEPS = {
    "1-RF": ("base", 1.0), "OT-CFM": ("base", 1.1), "W-CFM": ("base", 1.0), "Blockwise FM": ("base", 1.1),
    "MeanFlow": ("base", 3.0), "SplitMeanFlow": ("base", 2.5), "2-RF": ("reflow", 1.0), "2-RF improved": ("reflow", 1.0),
    "2-RF +U-shaped t": ("reflow", 1.0), "2-RF +pseudo-Huber 1/t": ("reflow", 1.0), "2-RF from scratch": ("reflow", 1.0),
    "distilled 2-RF": ("distill", 1.0), "distilled 1-RF": ("distill", 1.0), "SlimFlow annealed 2-RF": ("reflow", 0.6), "SlimFlow student": ("distill", 1.6),
    "conditional teacher": ("base", 1.0), "conditional 2-RF": ("reflow", 1.0), "conditional distilled": ("distill", 1.0),
}


# ----------------------------------------------------------------------------- W-CFM epsilon sweep


def wcfm_sweep(task: Task, S: Settings, epsilons: Sequence[float], root: Path, seed: int = 0,
               log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Quality at NFE 1/2/4/100 of W-CFM for each ``eps`` (``inf`` = plain CFM), seed ``seed``.

    The Gibbs weights tilt the marginals as ``eps`` falls: the sweep shows the trade between one-step
    quality (straighter) and many-step quality (biased) that sets the data set's default ``eps``."""
    from straightflow.straighten.wcfm import WeightedCFM

    rows = []
    runner = Runner(task, S, seed, root, log)
    noise = task.draw_source(S.n_eval, 424242 + seed)
    for eps in epsilons:
        d = root / "runs" / task.name / "wcfm-sweep" / f"eps{eps:g}-seed{seed}"
        res_file = d / "result.json"
        if res_file.is_file():
            rows.append(load_json(res_file))
            continue
        res = train(WeightedCFM(runner.mlp(), epsilon=float(eps), coupling=task.coupling()), task.train_data(seed),
                    S.base_steps, out=d, **runner.train_kw(S.base_steps))
        with torch.no_grad():
            q = {str(n): task.quality(sample(res.model, noise, solver="euler", steps=n).x) for n in NFES}
        row = {"epsilon": float(eps) if math.isfinite(eps) else "inf", "quality": q}  # strict JSON: no Infinity
        save_json(res_file, row)
        rows.append(row)
        log(f"  W-CFM eps {eps:g}: " + ", ".join(f"NFE {k}: {v:.4g}" for k, v in q.items()))
    return rows


def _sweep_markdown(sweeps: Dict[str, Any]) -> List[str]:
    lines = ["## W-CFM: epsilon sweep (seed 0)", "",
             "Gibbs weights `exp(-|x0 - x1|^2 / (d eps))`; `inf` = plain CFM (the 1-RF objective). The eps of "
             "the 2D sets (10) was chosen on moons and that of digits (1) on digits as the smallest swept eps whose "
             "NFE-100 quality stays within 1.1x of plain CFM: below it the weights tilt the marginals (worse at many "
             "steps) in exchange for straighter paths (better at one step).", ""]
    for name, sw in sweeps.items():
        lines += [f"**{name}** ({sw['metric']})", "", "| eps | NFE 1 | NFE 2 | NFE 4 | NFE 100 |", "|---:|---:|---:|---:|---:|"]
        for r in sw["rows"]:
            q = r["quality"]
            lines.append(f"| {r['epsilon']} | " + " | ".join(f"{q[str(n)]:.4g}" for n in NFES) + " |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- driver


def _available(module: str) -> Optional[str]:
    import importlib

    try:
        importlib.import_module(module)
        return None
    except ImportError as e:
        return f"{type(e).__name__}: {e}"


def _ms_per_step(task: Task, S: Settings) -> float:
    """Calibration: ms per training step of the base model on this machine."""
    m = MLP(dim=task.dim, hidden=S.hidden, depth=S.depth)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x = task.x[: S.batch]

    def step():
        t = torch.rand(x.shape[0])
        z = torch.randn_like(x)
        loss = (m(t[:, None] * x + (1 - t[:, None]) * z, t) - (x - z)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    return (time.perf_counter() - t0) * 100 * 1.3  # x1.3: trainer overhead (EMA, clipping, checks)


def _fmt(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    digits = 3 if abs(mean) < 10 else 1
    s = f"{mean:.{digits}f}" if abs(mean) >= 0.01 else f"{mean:.2e}"
    if n > 1:
        s += f" ± {std:.{digits}f}" if abs(std) >= 0.01 or std == 0 else f" ± {std:.1e}"
    return s


def _human(n: float) -> str:
    for unit, v in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= v:
            return f"{n / v:.1f}{unit}"
    return f"{n:.0f}"


def run_bench(out: Path, datasets: Sequence[str], seeds: int, quick: bool, digits_seeds: Optional[int] = None,
              command: str = "", log: Callable[[str], None] = print, mnist_seeds: Optional[int] = None,
              wcfm_epsilons: Sequence[float] = ()) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tasks: Dict[str, Task] = {}
    plan: Dict[str, int] = {}
    for name in datasets:
        kind = name if name in ("digits", "mnist") else "2d"
        try:
            tasks[name] = make_task(name, SETTINGS[(kind, quick)])
        except FileNotFoundError as e:
            if name != "mnist":
                raise
            log(f"[straighten] mnist skipped: {e}")
            continue
        image_seeds = mnist_seeds if kind == "mnist" else digits_seeds
        plan[name] = seeds if kind == "2d" or image_seeds is None else min(seeds, image_seeds)
    # time estimate from a calibration of the base model's step time
    est = 0.0
    for name, task in tasks.items():
        S = SETTINGS[(task.kind, quick)]
        ms = _ms_per_step(task, S)
        steps_per_seed = 0.0
        for stage, (which, f) in _STAGE_STEPS.items():
            if stage.startswith("conditional") and task.kind == "2d":
                continue
            n = {"base": S.base_steps, "reflow": S.reflow_steps, "distill": S.distill_steps}[which]
            steps_per_seed += n * f
        est += plan[name] * steps_per_seed * ms / 1000 * 1.15  # +15%: pairs and evaluation
    log(f"[straighten] data sets {', '.join(datasets)}; seeds {plan}; estimated {est / 60:.1f} min "
        f"(training from scratch on this machine; finished runs in {out / 'runs'} are reused)")

    status: Dict[str, Optional[str]] = {m[0]: _available(m[3]) for m in METHODS}
    results: Dict[str, Any] = {"command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
                               "quick": quick, "nfes": list(NFES), "datasets": {}}
    results["machine"] = machine_line()
    results["threads"] = torch.get_num_threads()
    for name, task in tasks.items():
        S = SETTINGS[(task.kind, quick)]
        ds_res: Dict[str, Any] = {"description": task.description, "metric": task.metric, "floor": task.floor(),
                                  "settings": asdict(S), "seeds": plan[name], "methods": {}}
        results["datasets"][name] = ds_res
        log(f"[straighten] {name}: {task.description}; floor {task.metric} = {ds_res['floor']:.4g}")
        for row, stage_key, sampler, module, digits_only, note in METHODS:
            if digits_only and task.kind == "2d":
                continue
            entry: Dict[str, Any] = {"note": note, "sampler": sampler, "seeds": {}}
            ds_res["methods"][row] = entry
            if status[row] is not None:
                entry["status"] = "not available"
                entry["error"] = status[row]
                log(f"  {row}: not available ({status[row]})")
                continue
            entry["status"] = "ok"
            for seed in range(plan[name]):
                runner = Runner(task, S, seed, out, log)
                t0 = time.perf_counter()
                try:
                    entry["seeds"][str(seed)] = runner.evaluate(row, stage_key, sampler,
                                                                cond_labels=row.startswith("conditional"))
                except NotApplicable as e:
                    entry["status"], entry["error"] = "not applicable", str(e)
                    break
                except ImportError as e:
                    entry["status"], entry["error"] = "not available", f"{type(e).__name__}: {e}"
                    break
                except Exception as e:  # keep going: report the failure in the table
                    entry["status"], entry["error"] = "failed", f"{type(e).__name__}: {e}"
                    log(traceback.format_exc())
                    break
                q = entry["seeds"][str(seed)]["quality"]
                log(f"  {row} seed {seed}: " + ", ".join(f"NFE {k}: {v:.4g}" for k, v in q.items())
                    + f" ({time.perf_counter() - t0:.1f} s)")
            _summarise(entry)
            save_json(out / "straighten.json", results)  # progress so far
        results["seconds"] = time.perf_counter() - t_start
        (out / "straighten.md").write_text(_markdown(results))  # tables so far (an interrupted run keeps them)
    if wcfm_epsilons:
        results["wcfm_sweep"] = {}
        for name, task in tasks.items():
            if task.kind == "mnist":  # 784-D: one full training per eps does not fit this suite's budget
                log("[straighten] W-CFM eps sweep: skipped on mnist (cost)")
                continue
            log(f"[straighten] W-CFM eps sweep on {name}")
            rows = wcfm_sweep(task, SETTINGS[(task.kind, quick)], list(wcfm_epsilons) + [math.inf], out, log=log)
            results["wcfm_sweep"][name] = {"metric": task.metric, "rows": rows}
    results["seconds"] = time.perf_counter() - t_start
    save_json(out / "straighten.json", results)
    _figures(out, results, tasks)
    md = _markdown(results)
    (out / "straighten.md").write_text(md)
    log(md)
    return results


def _summarise(entry: Dict[str, Any]) -> None:
    runs = list(entry["seeds"].values())
    if not runs:
        return
    agg: Dict[str, Any] = {}
    for nfe in NFES:
        v = np.array([r["quality"][str(nfe)] for r in runs], dtype=float)
        agg[f"nfe{nfe}"] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]
    s = np.array([r.get("straightness", float("nan")) for r in runs], dtype=float)
    agg["straightness"] = [float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else 0.0]
    c = runs[0]["cost"]
    agg["cost"] = {"pair_nfe": c["pair_nfe"], "train_rows": c["train_rows"], "total": c["pair_nfe"] + c["train_rows"]}
    agg["n"] = len(runs)
    entry["summary"] = agg


def _markdown(results: Dict[str, Any]) -> str:
    report = Report("Straighten and compress: quality vs NFE, straightness, cost",
                    results["command"] or "straightflow bench straighten",
                    Timing(results.get("threads", torch.get_num_threads()), warmup=0, repeats=0,
                           note="Cost is counted in velocity evaluations and training rows, not seconds."),
                    quick=bool(results.get("quick")), date=str(results["date"])[:10],
                    machine=results.get("machine") or machine_line())
    lines = [f"Wall time: {results.get('seconds', 0) / 60:.1f} min (runs reused from a previous invocation are not re-timed)", "",
             "Quality: exact W2 (POT) against held-out data for 2D, Fréchet distance in the project digits "
             "classifier's features for digits; the data-vs-data floor is the same metric between two "
             "independent held-out draws (2D) or two disjoint halves of the data set (digits) at the same sample size. Euler sampling for velocity models, the "
             "average-velocity sampler for MeanFlow/SplitMeanFlow, the re-noise sampler where stated. Straightness "
             "(Liu et al. 2022) of the NFE-100 trajectories (0 = straight lines at constant speed). Cost = velocity "
             "evaluations spent generating pairs (and SlimFlow's teacher guidance) + training rows (steps x batch), "
             "summed over every stage the method depends on. Values: mean ± std over seeds.", ""]
    best_lines: List[str] = []
    for name, ds in results["datasets"].items():
        S = ds["settings"]
        lines += [f"## {name}: {ds['description']}", "",
                  f"Floor ({ds['metric']}, data vs data): **{ds['floor']:.4g}**; seeds: {ds['seeds']}. Settings: "
                  f"MLP hidden {S['hidden']} x depth {S['depth']}, batch {S['batch']}, lr {S['lr']} (cosine), "
                  f"{S['base_steps']} steps for models trained from data, {S['reflow_steps']} for each reflow, "
                  f"{S['distill_steps']} for each distillation; {S['n_pairs']} pairs by RK4 x {S['pair_steps']} steps "
                  f"({4 * S['pair_steps']} NFE each); W-CFM eps {S['wcfm_epsilon']} (cost |x0-x1|^2/d); "
                  f"{S['num_blocks']} blocks; SlimFlow student hidden {S['slim_hidden']}; CFG scale {S['guidance']} "
                  f"for the conditional teacher; {S['n_eval']} samples scored.", "",
                  f"| method | {ds['metric']} NFE 1 | NFE 2 | NFE 4 | NFE 100 | straightness | pair NFE | train rows | total cost | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        ref100 = None
        rf = ds["methods"].get("1-RF", {}).get("summary")
        if rf:
            ref100 = rf["nfe100"][0]
        best: Tuple[float, str] = (math.inf, "")
        for row, e in ds["methods"].items():
            if e.get("status") != "ok" or "summary" not in e:
                lines.append(f"| {row} | {e.get('status', 'n/a')} | | | | | | | | {e.get('error', '')} |")
                continue
            a = e["summary"]
            n = a["n"]
            q = [_fmt(*a[f"nfe{k}"], n) for k in NFES]
            c = a["cost"]
            lines.append(f"| {row} | {q[0]} | {q[1]} | {q[2]} | {q[3]} | {_fmt(*a['straightness'], n)} | "
                         f"{_human(c['pair_nfe'])} | {_human(c['train_rows'])} | {_human(c['total'])} | {e['note']} |")
            # the 1-RF reference is unconditional: a class-conditional student (labels given, CFG teacher)
            # answers a different question and is not a candidate for "best one-step model"
            if a["nfe1"][0] < best[0] and not row.startswith("conditional"):
                best = (a["nfe1"][0], row)
        lines.append("")
        if ref100 is not None and best[1]:
            ratio = best[0] / ref100
            s = (f"- **{name}**: best unconditional one-step model: {best[1]} ({ds['metric']} {best[0]:.4g}) = "
                 f"{ratio:.2f}x the 1-RF's 100-step quality ({ref100:.4g}); floor {ds['floor']:.4g}.")
            cond = ds["methods"].get("conditional distilled", {}).get("summary")
            if cond:
                s += (f" The class-conditional one-step student (labels given, CFG-2 teacher) reaches "
                      f"{cond['nfe1'][0]:.4g} at NFE 1: not comparable with the unconditional 1-RF.")
            lines += [s.replace("- ", "", 1), ""]
            best_lines.append(s)
    lines += ["![quality vs NFE](straighten_nfe.png)", ""]
    if best_lines:
        lines += ["## Summary: best one-step model vs 1-RF at NFE 100", ""] + best_lines + [""]
    if results.get("wcfm_sweep"):
        lines += _sweep_markdown(results["wcfm_sweep"])
    lines += ["Figures: `straighten_nfe.png` (quality vs NFE, mean over seeds, floor dashed), "
              "`samples_<dataset>.png` (NFE-1 samples of seed 0 for each method).", ""]
    return report.add(*lines).render()


def _figures(out: Path, results: Dict[str, Any], tasks: Dict[str, Task]) -> None:

    plt = pyplot()
    names = list(results["datasets"])
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        ds = results["datasets"][name]
        for i, (row, e) in enumerate(ds["methods"].items()):
            a = e.get("summary")
            if e.get("status") != "ok" or not a:
                continue
            ys = [a[f"nfe{k}"][0] for k in NFES]
            ax.plot(NFES, ys, ms=3, lw=1, label=row, **series_style(i))
        ax.axhline(ds["floor"], color="k", ls="--", lw=1, label="data-vs-data floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(NFES, labels=[str(k) for k in NFES])
        ax.set_xlabel("NFE")
        ax.set_ylabel(ds["metric"])
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "straighten_nfe.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    for name in names:
        panels = []
        for row, e in results["datasets"][name]["methods"].items():
            f = out / "runs" / name / _slug(row) / "seed0" / "samples_nfe1.safetensors"
            if e.get("status") == "ok" and f.is_file():
                panels.append((row, load_tensors(f)["x"]))
        if not panels:
            continue
        task = tasks[name]
        if task.kind == "2d":
            save_scatter_panels([(t, x[:1000]) for t, x in panels], out / f"samples_{name}.png",
                                reference=task.ref_a[:1000], suptitle=f"{name}: NFE-1 samples (seed 0)")
        else:
            k = task.side
            save_image_panels([(t, x[:40].reshape(-1, 1, k, k)) for t, x in panels], out / f"samples_{name}.png",
                              nrow=8, suptitle=f"{name}: NFE-1 samples (seed 0)")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None, help="seeds per 2D data set (mean ± std; default 3, --quick 1)")
    p.add_argument("--digits-seeds", type=int, default=1,
                   help="seeds for digits (default 1 to fit the time budget; at most --seeds)")
    p.add_argument("--mnist-seeds", type=int, default=1, help="seeds for MNIST (default 1; at most --seeds)")
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated subset of {','.join(DATASETS)} (default: all, MNIST when "
                        "../shared/data has it; --quick: moons,8g-moons,digits)")
    p.add_argument("--wcfm-sweep", default="",
                   help="comma-separated W-CFM eps values to sweep on each data set (seed 0; plain CFM added)")


def run(a: argparse.Namespace) -> int:
    if a.seeds is None:
        a.seeds = 1 if a.quick else 3
    if a.seeds < 1 or a.digits_seeds < 1 or a.mnist_seeds < 1:
        raise ValueError("--seeds, --digits-seeds and --mnist-seeds must be >= 1")
    names = [s.strip() for s in (a.datasets or ("moons,8g-moons,digits" if a.quick else ",".join(DATASETS))).split(",")
             if s.strip()]
    bad = [n for n in names if n not in DATASETS]
    if bad:
        raise ValueError(f"unknown data set(s) {', '.join(bad)}; valid: {', '.join(DATASETS)}")
    try:
        eps = [float(v) for v in a.wcfm_sweep.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--wcfm-sweep takes comma-separated numbers, got {a.wcfm_sweep!r}") from None
    if any(not (e > 0) for e in eps):
        raise ValueError("--wcfm-sweep values must be > 0")
    run_bench(a.out, names, a.seeds, a.quick, digits_seeds=a.digits_seeds, command=a.command,
              wcfm_epsilons=eps, mnist_seeds=a.mnist_seeds)
    print(f"[straighten] wrote {a.out / 'straighten.md'}, straighten.json, straighten_nfe.png")
    return 0


SUITE = register_suite("straighten", "reflow, distillation, one-step models and 1-RF variants: quality vs NFE, "
                       "straightness, cost", _arguments, run, doc=__doc__.split("\n\n")[0])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``straightflow bench straighten ARGS``."""
    return run_suite("straighten", argv)
