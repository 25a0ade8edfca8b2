"""``straightflow bench align``: alignment methods against inference-time scaling at equal compute.

Tasks: ``2d`` (eight Gaussians, a soft disc around one mode), ``digits`` (class reward ``log p(3 | x)``
on unconditional -- null-label -- generation of a class-conditional digits UNet), ``ink`` (stroke
thickness on the same model), ``control`` (Pendulum flow policy: behaviour cloning, then ReinFlow).

For every method of :mod:`straightflow.align` (each trained through ``sf.align.align`` on the same base
run): the reward on fresh samples (held-out noise) at NFE 1, 4 and 20 (Euler); a **held-out reward**
not used in training (2d: the hard indicator of the disc; digits: ``log p(3 | x)`` under a second
classifier trained with another seed; ink: the share of strongly inked pixels); quality (2d: exact W2
to the reward-tilted data ``p_data exp(lambda r)``, lambda = ``--tilt``; digits: classifier-FD to the
real digits of class 3; ink: classifier-FD to all digits -- each with its data-vs-data floor at the
same sample size); diversity (mean pairwise distance, classifier features for images); the W2 drift
from the base model's samples (same noise); training cost (CPU seconds and model-forward equivalents,
:func:`straightflow.align.base.forward_equivalents`). Beside them, the base model with best-of-N, SMC,
RBF and Flow-NRG at NFE 20 per sample and at **equal total compute**: a budget per sample of the
aligned model's sampling NFE (4) plus its training compute amortised over 1,000 samples.

Timings: one thread (``--threads``), CPU process time. Writes ``OUT/align.md``, ``OUT/align.json``,
``OUT/align_frontier.png`` (reward vs quality), ``OUT/align_cost.png`` (reward vs training compute),
``OUT/align_digits.png`` (samples) and ``OUT/align_control.png``; base runs are cached in ``OUT/runs``
(the one helper :func:`_base_run` trains them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from straightflow import plotting
from straightflow.align import align, available
from straightflow.align.base import forward_equivalents, prompt_labels
from straightflow.align.policy import behaviour_clone, evaluate as evaluate_policy, reinflow_finetune
from straightflow.align.rewards import InkReward, held_out_classifier
from straightflow.control.nrg import train_noisy_reward
from straightflow.control.rewards import ClassLogProb, RegionReward
from straightflow.control.scaling import diversity, search
from straightflow.data import toy_2d
from straightflow.metrics import classifier_features, evaluate, feature_extractor, frechet_distance, load_digits_images, w2
from straightflow.solvers import sample
from .harness import Report, Timing, cached_model, register_suite, run_suite, write_report

METHOD_ORDER = ("sft", "rwr", "dpo", "grpo", "reinflow", "adjoint_matching", "draft")
SEARCHES = ("best_of_n", "smc", "rbf", "nrg")
TASKS = ("2d", "digits", "ink", "control")
EVAL_NFE = (1, 4, 20)
AMORTISE = 1000
SAMPLE_NFE = 4  # the aligned model's sampling NFE in the equal-compute comparison


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated alignment methods")
    p.add_argument("--searches", default=",".join(SEARCHES), help="comma-separated inference-time methods")
    p.add_argument("--seeds", type=int, default=3, help="control: seeds (BC + fine-tuning each)")
    p.add_argument("--denoise-steps", default="1,4", help="control: denoising steps of the policy")
    p.add_argument("--rollouts", type=int, default=40, help="control: ReinFlow rollouts (16 episodes each)")
    p.add_argument("--n-eval", type=int, default=None, help="fresh samples per evaluation (default 1000; quick 64)")
    p.add_argument("--n-search", type=int, default=None, help="outputs per search run (default 128; quick 8)")
    p.add_argument("--tilt", type=float, default=5.0, help="2d: lambda of the tilted data p exp(lambda r) for W2")


# ----------------------------------------------------------------------------- base runs (one helper)
def _base_run(kind: str, out: Path, quick: bool):
    """The base model of a task, trained once and cached under ``out/runs`` (resumes if interrupted):
    ``"2d"``: an MLP on eight Gaussians; ``"digits"``: the class-conditional digits UNet (base 16) of
    ``bench control``. Returns ``(model, run_dir)``."""
    if kind == "2d":
        steps = 50 if quick else 4000
        name, recipe = f"8gaussians-mlp-s{steps}", {
            "data": "8gaussians", "steps": steps, "n": 50_000, "hidden": 128, "depth": 3, "batch_size": 512,
            "lr": 2e-3, "warmup": 100, "lr_schedule": "cosine", "ckpt_every": 1000, "seed": 0}
    elif kind == "digits":
        steps = 10 if quick else 2500
        name, recipe = f"digits-c16-s{steps}", {"data": "digits", "steps": steps, "base_channels": 16,
                                                "batch_size": 64 if quick else 128, "ckpt_every": 500, "seed": 0}
    else:
        raise ValueError(f"unknown base run kind {kind!r}")
    model, run_dir, _ = cached_model(out, name, recipe)
    return model, run_dir


# ----------------------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    model: Any
    run: str
    shape: Tuple[int, ...]
    label: Optional[int]
    reward: Any
    held_out: Any
    reward_spec: Any
    quality_name: str
    quality: Callable[[Tensor], Tuple[float, float]]
    features: Optional[Callable[[Tensor], Tensor]]
    methods: Dict[str, Dict[str, Any]]
    n_eval: int
    n_search: int
    notes: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


def _fd_quality(ref: Tensor, seeds: int = 3):
    """classifier-FD to ``ref`` with its floor, mean over ``seeds`` splits: the split and sizes of
    :func:`straightflow.metrics.evaluate` (m = min(n, len(ref) // 2), seeded halves of ``ref``), with the
    reference features and the floor (which does not depend on the samples) computed once."""

    net = feature_extractor("digits")
    fr = classifier_features(ref, net)
    half = ref.shape[0] // 2
    floors: Dict[Tuple[int, int], float] = {}

    def q(x: Tensor) -> Tuple[float, float]:
        fx = classifier_features(x, net)
        m = min(x.shape[0], half)
        vals, flo = [], []
        for s in range(seeds):
            g = torch.Generator().manual_seed(s)
            perm = torch.randperm(fr.shape[0], generator=g)
            a, b = fr[perm[:m]], fr[perm[half:half + m]]
            fs = fx[torch.randperm(fx.shape[0], generator=g)[:m]] if fx.shape[0] > m else fx
            vals.append(frechet_distance(fs, a))
            if (m, s) not in floors:
                floors[(m, s)] = frechet_distance(a, b)
            flo.append(floors[(m, s)])
        return sum(vals) / seeds, sum(flo) / seeds

    return q


def _w2_quality(ref: Tensor):

    def q(x: Tensor) -> Tuple[float, float]:
        r = evaluate(x, ref, "w2", seed=0, max_n=2000)
        return r.value, r.floor

    return q


def _method_configs(kind: str, quick: bool) -> Dict[str, Dict[str, Any]]:
    """align() settings per method (the tuned defaults of this benchmark)."""
    if quick:
        common = dict(steps=2, batch_size=4, n_data=8, lr=1e-4)
        return {"sft": dict(common, gen_steps=2), "rwr": dict(common, gen_steps=2), "dpo": dict(common, gen_steps=2),
                "grpo": dict(common, group=2, sde_steps=2), "reinflow": dict(common, group=2, denoise_steps=2),
                "adjoint_matching": dict(common, sde_steps=3), "draft": dict(common, sample_steps=2)}
    if kind == "2d":
        off = dict(steps=1500, batch_size=256, n_data=2048, lr=1e-4, k=4, gen_steps=20)
        return {
            "sft": dict(off), "rwr": dict(off, reg=0.2), "dpo": dict(off, reg=200.0),
            "grpo": dict(steps=300, batch_size=16, group=16, sde_steps=10, lr=1e-3, reg=0.1),
            "reinflow": dict(steps=300, batch_size=16, group=16, denoise_steps=4, lr=1e-3, reg=0.1),
            "adjoint_matching": dict(steps=300, batch_size=64, sde_steps=20, lr=1e-3, reg=0.2),
            "draft": dict(steps=300, batch_size=128, sample_steps=4, truncate=1, lr=1e-3, reg=0.1),
        }
    # digits and ink: settings chosen by a small sweep on the digits class task (see BENCHMARKS.md): the offline
    # methods share one learning rate, so Flow-DPO, Flow-RWR and SFT differ only in their objective.
    off = dict(steps=600, batch_size=64, n_data=1024, lr=3e-4, k=4, gen_steps=20)
    if kind == "digits":
        return {
            "sft": dict(off), "rwr": dict(off, reg=1.0), "dpo": dict(off, reg=5000.0),
            "grpo": dict(steps=300, batch_size=8, group=8, sde_steps=10, lr=1e-4, reg=0.3),
            "reinflow": dict(steps=300, batch_size=8, group=8, denoise_steps=4, lr=1e-4, reg=0.01),
            "adjoint_matching": dict(steps=200, batch_size=16, sde_steps=20, lr=1e-4, reg=1.0),
            "draft": dict(steps=100, batch_size=32, sample_steps=4, truncate=1, lr=1e-4, reg=1.0),
        }
    return {  # ink: rewards are mean ink, ~0.1-0.5, so the temperatures and lambdas are in those units
        "sft": dict(off), "rwr": dict(off, reg=0.05), "dpo": dict(off, reg=5000.0),
        "grpo": dict(steps=300, batch_size=8, group=8, sde_steps=10, lr=1e-4, reg=0.3),
        "reinflow": dict(steps=300, batch_size=8, group=8, denoise_steps=4, lr=1e-4, reg=0.01),
        "adjoint_matching": dict(steps=200, batch_size=16, sde_steps=20, lr=1e-4, reg=0.02),
        "draft": dict(steps=100, batch_size=32, sample_steps=4, truncate=1, lr=1e-4, reg=0.01),
    }


def _make_task(name: str, out: Path, quick: bool, a) -> Task:

    n_eval = a.n_eval or (32 if quick else 1000)
    n_search = a.n_search or (8 if quick else 128)
    if name == "2d":
        model, run = _base_run("2d", out, quick)
        centre = (2.8, 0.0)
        reward = RegionReward("disc", center=centre, radius=0.5, temperature=0.1)
        held = RegionReward("disc", center=centre, radius=0.5, temperature=None)
        pool = toy_2d("8gaussians", 40_000, seed=777)
        w = torch.exp(a.tilt * reward(pool).double())
        idx = torch.multinomial(w / w.sum(), 8000, replacement=True, generator=torch.Generator().manual_seed(1))
        ref = pool[idx]
        return Task(name, model, run, (2,), None, reward, held, reward, f"W2 to tilted data (lambda={a.tilt:g})",
                    _w2_quality(ref), None, _method_configs("2d", quick), n_eval, 4 * n_search,
                    notes=f"eight Gaussians (radius 2.8, std 0.2), reward: soft disc at {centre} radius 0.5 T=0.1; "
                          "held-out: the same disc, hard indicator (hit rate)")
    model, run = _base_run("digits", out, quick)
    x, y = load_digits_images(8)
    if name == "digits":
        reward = ClassLogProb(3)
        held = held_out_classifier(3, steps=40 if quick else None)
        return Task(name, model, run, (1, 8, 8), None, reward, held, "class:3", "classifier-FD to class-3 digits",
                    _fd_quality(x[y == 3], 1 if quick else 3), _digit_features(), _method_configs("digits", quick),
                    n_eval, n_search, notes="null-label (unconditional) generation; reward log p(3 | x) (project "
                    "classifier); held-out: log p(3 | x) under a second classifier (seed 1)",
                    extra={"base_cond_label": 3})
    if name == "ink":
        reward = InkReward()
        held = InkReward(0.5)
        return Task(name, model, run, (1, 8, 8), None, reward, held, reward, "classifier-FD to all digits",
                    _fd_quality(x, 1 if quick else 3), _digit_features(), _method_configs("ink", quick),
                    n_eval, n_search, notes="null-label generation; reward: mean ink (stroke thickness); held-out: "
                    "soft share of pixels above 0.5")
    raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")


# ----------------------------------------------------------------------------- evaluation
def _cond(task: Task, n: int, label: Optional[int] = None) -> Optional[Dict[str, Tensor]]:

    y = prompt_labels(task.model, task.label if label is None else label, n)
    return None if y is None else {"y": y}


@torch.no_grad()
def _samples(model, task: Task, nfe: int, n: int, seed: int = 12345, label: Optional[int] = None) -> Tensor:

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *task.shape), generator=g)
    cond = _cond(task, n, label)
    return sample(model, noise, solver="euler", steps=nfe, cond=cond).x


def _score(fn, x: Tensor) -> float:
    with torch.no_grad():
        return float(torch.as_tensor(fn(x)).double().mean())


def _diversity(task: Task, x: Tensor) -> float:

    return diversity(x[:500], task.features)


def _digit_features():

    net = feature_extractor("digits")
    return lambda x: classifier_features(x, net)


def _evaluate(model, task: Task, base_x20: Optional[Tensor], label: Optional[int] = None) -> Dict[str, Any]:

    row: Dict[str, Any] = {"reward": {}, "held_out": {}}
    xs = {}
    for nfe in EVAL_NFE:
        xs[nfe] = _samples(model, task, nfe, task.n_eval, label=label)
        row["reward"][nfe] = _score(task.reward, xs[nfe])
        row["held_out"][nfe] = _score(task.held_out, xs[nfe])
    for nfe in (SAMPLE_NFE, 20):
        v, f = task.quality(xs[nfe])
        row[f"quality@{nfe}"], row["quality_floor"] = v, f
    row["diversity"] = _diversity(task, xs[20])
    if base_x20 is not None:
        a = xs[20][:500].reshape(min(500, xs[20].shape[0]), -1)
        b = base_x20[:500].reshape(a.shape[0], -1)
        row["w2_drift"] = w2(a, b, max_n=500)
    row["_x"] = xs[20][:64]
    return row


def _search_row(task: Task, method: str, budget: int, nrg_reward=None) -> Dict[str, Any]:

    t0 = time.process_time()
    kw: Dict[str, Any] = {"seed": 4321, "cond": _cond(task, task.n_search)}
    reward = task.reward
    if method == "nrg":
        reward = nrg_reward if nrg_reward is not None else task.reward
        if getattr(reward, "noisy", False):
            kw["steps"] = min(budget, 200)
    res = search(task.model, reward, task.shape, int(budget), method, n=task.n_search, **kw)
    x = res.x.detach().float()
    q, f = task.quality(x)
    return {"method": method, "budget": int(budget), "nfe": int(res.nfe), "reward": _score(task.reward, x),
            "held_out": _score(task.held_out, x), "quality": q, "quality_floor": f, "diversity": _diversity(task, x),
            "seconds": round(time.process_time() - t0, 2)}


def _train_nrg_reward(task: Task, quick: bool):
    """Flow-NRG's noisy reward model, fitted on base-model samples (cost: their NFE; reported)."""

    n, nfe = (64, 4) if quick else (4000, 20)
    t0 = time.process_time()
    x = _samples(task.model, task, nfe, n, seed=999)
    net = train_noisy_reward(task.reward, x, steps=20 if quick else 1500, seed=0)
    return net, {"samples": n, "nfe": n * nfe, "seconds": round(time.process_time() - t0, 2)}


def run_task(task: Task, methods: Sequence[str], searches: Sequence[str], out: Path, quick: bool, progress=False) -> Dict[str, Any]:

    print(f"[bench align] task {task.name}: base {task.run}", flush=True)
    base_x20 = _samples(task.model, task, 20, task.n_eval)
    res: Dict[str, Any] = {"task": task.name, "run": task.run, "notes": task.notes, "quality": task.quality_name,
                           "reward_name": getattr(task.reward, "name", str(task.reward)),
                           "held_out_name": getattr(task.held_out, "name", str(task.held_out)), "rows": []}
    base = _evaluate(task.model, task, None)
    base.update(method="base", cost={}, train_equiv=0.0)
    res["base"] = base
    if "base_cond_label" in task.extra:
        bc = _evaluate(task.model, task, None, label=task.extra["base_cond_label"])
        bc.update(method=f"base, label {task.extra['base_cond_label']}", cost={}, train_equiv=0.0)
        res["base_conditional"] = bc
    for m in methods:
        cfg = dict(task.methods[m])
        print(f"[bench align]   {task.name}/{m} {cfg}", flush=True)
        t0 = time.process_time()
        tag = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]  # new settings, new run
        ar = align(task.model, method=m, reward=task.reward_spec, out=out / "runs" / f"align-{task.name}-{m}-{tag}",
                   label=task.label, progress=progress, ckpt_every=10_000, seed=0, **cfg)
        secs = time.process_time() - t0
        row = _evaluate(ar.model, task, base_x20)
        row.update(method=m, cost=ar.cost, train_seconds=round(secs, 2), train_equiv=forward_equivalents(ar.cost),
                   settings=cfg, final_loss=ar.final_loss)
        res["rows"].append(row)
    # inference-time scaling on the base model: at NFE 20 and at each method's equal total compute
    nrg_reward, nrg_cost = (None, None)
    if "nrg" in searches:
        nrg_reward, nrg_cost = _train_nrg_reward(task, quick)
        res["nrg_reward_model"] = nrg_cost
    res["search_20"] = [_search_row(task, s, 20, nrg_reward) for s in searches]
    res["search_equal"] = {}
    for i, row in enumerate(res["rows"]):
        b = int(round(SAMPLE_NFE + row["train_equiv"] / AMORTISE))
        row["equal_budget"] = b
        if quick and i > 0:  # quick mode checks the pipeline: one equal-compute comparison per task
            continue
        res["search_equal"][row["method"]] = [_search_row(task, s, b, nrg_reward) for s in searches]
    return res


# ----------------------------------------------------------------------------- control
def run_control(out: Path, quick: bool, seeds: int, ks: Sequence[int], rollouts: int, progress=False) -> Dict[str, Any]:

    eps = 2 if quick else 50
    rows = []
    for seed in range(seeds):
        bc_dir = out / "runs" / f"pendulum-bc-s{seed}"
        t0 = time.process_time()
        bc, info = behaviour_clone(out=bc_dir, steps=20 if quick else 3000, episodes=2 if quick else 30,
                                   lr=2e-3, seed=seed, progress=progress)
        bc_secs = time.process_time() - t0
        for k in ks:
            before = evaluate_policy(bc.model, steps=k, episodes=eps, seed=10_000 + 100 * seed)
            opts = dict(n_envs=2, horizon=20, minibatch=20, epochs=1) if quick else {}
            t0 = time.process_time()
            ft = reinflow_finetune(bc.model, out=out / "runs" / f"pendulum-reinflow-k{k}-s{seed}",
                                   rollouts=1 if quick else rollouts, denoise_steps=k, seed=seed, progress=progress,
                                   ckpt_every=10_000, **opts)
            after = evaluate_policy(ft.model, steps=k, episodes=eps, seed=10_000 + 100 * seed)
            rows.append({"seed": seed, "denoise_steps": k, "expert_return": info["expert_return"],
                         "bc": before, "reinflow": after, "bc_seconds": round(bc_secs, 1),
                         "ft_seconds": round(time.process_time() - t0, 1), "env_steps": ft.cost["env_steps"],
                         "model_calls": ft.cost["forward"] + ft.cost["grad_forward"]})
            print(f"[bench align]   control seed {seed} K={k}: BC {before['mean']:.1f} -> ReinFlow {after['mean']:.1f}",
                  flush=True)
    return {"task": "control", "rows": rows, "episodes": eps, "rollouts": 1 if quick else rollouts}


# ----------------------------------------------------------------------------- report
def _f(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"


def _task_markdown(r: Dict[str, Any]) -> List[str]:
    L = [f"### {r['task']}", "", f"{r['notes']}. Base run `{r['run']}`. Quality: {r['quality']} (floor "
         f"{_f(r['base']['quality_floor'])}). Reward `{r['reward_name']}`, held-out `{r['held_out_name']}`.", "",
         "| model | reward NFE 1 | NFE 4 | NFE 20 | held-out NFE 4 | NFE 20 | quality@4 | quality@20 | diversity | "
         "W2 drift | train CPU s | train fwd-equiv | equal budget/sample |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def line(row):
        rw, ho = row["reward"], row["held_out"]
        return (f"| {row['method']} | {_f(rw[1])} | {_f(rw[4])} | {_f(rw[20])} | {_f(ho[4])} | {_f(ho[20])} | "
                f"{_f(row['quality@4'], 2)} | {_f(row['quality@20'], 2)} | {_f(row['diversity'], 2)} | "
                f"{_f(row.get('w2_drift'), 3)} | {_f(row.get('train_seconds'), 1)} | {row.get('train_equiv', 0):.3g} | "
                f"{row.get('equal_budget', '-')} |")

    L.append(line(r["base"]))
    if "base_conditional" in r:
        L.append(line(r["base_conditional"]))
    for row in r["rows"]:
        L.append(line(row))
    L += ["", f"Inference-time scaling on the base model ({len(r['search_20'])} methods; outputs per run: "
          f"{r.get('n_search', '')}). `NFE 20` is the usual per-sample budget; `= m` is the budget of method m's "
          "total compute (sampling at NFE 4 + training amortised over 1,000 samples).", "",
          "| search | budget | reward | held-out | quality | diversity | CPU s |", "|---|---|---|---|---|---|---|"]
    for s in r["search_20"]:
        L.append(f"| {s['method']} | 20 | {_f(s['reward'])} | {_f(s['held_out'])} | {_f(s['quality'], 2)} | "
                 f"{_f(s['diversity'], 2)} | {_f(s['seconds'], 1)} |")
    for m, rows in r["search_equal"].items():
        for s in rows:
            L.append(f"| {s['method']} | {s['budget']} (= {m}) | {_f(s['reward'])} | {_f(s['held_out'])} | "
                     f"{_f(s['quality'], 2)} | {_f(s['diversity'], 2)} | {_f(s['seconds'], 1)} |")
    if r.get("nrg_reward_model"):
        c = r["nrg_reward_model"]
        L += ["", f"Flow-NRG's noisy reward model: fitted on {c['samples']} base samples ({c['nfe']} NFE, "
              f"{c['seconds']} CPU s), not counted in the budgets above."]
    L.append("")
    return L


def _targets(results: Dict[str, Any]) -> List[str]:
    L = ["## Against the targets", ""]
    d = results["tasks"].get("digits")
    if d:
        rbf = next((s for s in d["search_20"] if s["method"] == "rbf"), None)
        base3 = d.get("base_conditional", d["base"])
        L += ["**Digits class reward, aligned model at NFE 4 vs RBF on the base model at NFE 20 per sample** "
              f"(RBF reward {_f(rbf['reward']) if rbf else '-'}; base conditioned on label 3: classifier-FD@4 "
              f"{_f(base3['quality@4'], 2)}, diversity {_f(base3['diversity'], 2)}; unconditional base: held-out "
              f"{_f(d['base']['held_out'][4])}).", "",
              "| method | reward@4 | beats RBF@20 by | FD@4 / base(3) FD@4 (<= 1.5) | diversity / base(3) (>= 0.5) | "
              "held-out@4 - base held-out@4 (>= 0) | all met |", "|---|---|---|---|---|---|---|"]
        for row in d["rows"]:
            dr = row["reward"][4] - (rbf["reward"] if rbf else float("nan"))
            fq = row["quality@4"] / base3["quality@4"]
            dv = row["diversity"] / base3["diversity"]
            ho = row["held_out"][4] - d["base"]["held_out"][4]
            ok = dr > 0 and fq <= 1.5 and dv >= 0.5 and ho >= 0
            L.append(f"| {row['method']} | {_f(row['reward'][4])} | {dr:+.3f} | {fq:.2f} | {dv:.2f} | {ho:+.3f} | "
                     f"{'yes' if ok else 'no'} |")
        L.append("")
    L += ["**Flow-DPO vs Flow-RWR vs plain fine-tuning (SFT) on the chosen samples** (same generated pairs, same "
          "steps): reward at NFE 20 (held-out in brackets).", "", "| task | SFT | RWR | DPO | DPO best? |", "|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        if name == "control":
            continue
        got = {row["method"]: row for row in r["rows"]}
        if not all(k in got for k in ("sft", "rwr", "dpo")):
            continue
        cells = [f"{_f(got[k]['reward'][20])} ({_f(got[k]['held_out'][20])})" for k in ("sft", "rwr", "dpo")]
        margin = got["dpo"]["reward"][20] - max(got["sft"]["reward"][20], got["rwr"]["reward"][20])
        L.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if margin > 0 else 'no'} ({margin:+.3f}) |")
    L.append("")
    c = results["tasks"].get("control")
    if c:
        L += ["**Control (Pendulum-v1): flow policy, behaviour-cloned vs ReinFlow-fine-tuned** (mean return over "
              f"{c['episodes']} evaluation episodes, injected noise off; {c['rollouts']} rollouts of 16 episodes).", "",
              "| denoising steps | seed | expert (noisy) | BC | ReinFlow | gain | env steps | CPU s |", "|---|---|---|---|---|---|---|---|"]
        for row in c["rows"]:
            L.append(f"| {row['denoise_steps']} | {row['seed']} | {row['expert_return']:.1f} | {row['bc']['mean']:.1f} | "
                     f"{row['reinflow']['mean']:.1f} | {row['reinflow']['mean'] - row['bc']['mean']:+.1f} | "
                     f"{row['env_steps']} | {row['ft_seconds']:.0f} |")
        ks = sorted({r["denoise_steps"] for r in c["rows"]})
        for k in ks:
            rr = [r for r in c["rows"] if r["denoise_steps"] == k]
            g = [r["reinflow"]["mean"] - r["bc"]["mean"] for r in rr]
            L.append(f"| {k} | mean of {len(rr)} | | {sum(r['bc']['mean'] for r in rr) / len(rr):.1f} | "
                     f"{sum(r['reinflow']['mean'] for r in rr) / len(rr):.1f} | {sum(g) / len(g):+.1f} "
                     f"(rises in {sum(v > 0 for v in g)}/{len(g)} seeds) | | |")
        L.append("")
    return L


def _plots(results: Dict[str, Any], out: Path) -> None:

    plt = plotting.pyplot()
    tasks = [r for k, r in results["tasks"].items() if k != "control"]
    if tasks:
        colors = plt.get_cmap("tab10")
        for fname, xkey, xlabel in (("align_frontier.png", "quality", "quality (lower is better)"),
                                    ("align_cost.png", "cost", "training compute (model-forward equivalents)")):
            fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
            for ax, r in zip(axes[0], tasks):
                pts = [("base", r["base"])] + [(row["method"], row) for row in r["rows"]]
                for i, (name, row) in enumerate(pts):
                    if xkey == "quality":
                        ax.scatter([row["quality@4"]], [row["reward"][4]], color=colors(i % 10), label=f"{name} @4",
                                   marker="o")
                        ax.scatter([row["quality@20"]], [row["reward"][20]], color=colors(i % 10), marker="^", s=18)
                    else:
                        ax.scatter([max(row["train_equiv"], 1.0)], [row["reward"][4]], color=colors(i % 10), label=name)
                for j, s in enumerate(r["search_20"] + [s for v in r["search_equal"].values() for s in v]):
                    x = s["quality"] if xkey == "quality" else s["budget"] * AMORTISE
                    ax.scatter([x], [s["reward"]], color="gray", marker="x", s=14,
                               label="search (base)" if j == 0 else None)
                if xkey == "quality":
                    ax.axvline(r["base"]["quality_floor"], color="k", ls=":", lw=0.8, label="floor")
                else:
                    ax.set_xscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"reward: {r['reward_name']}")
                ax.set_title(r["task"], fontsize=10)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=6)
            plotting.save_figure(fig, out / fname)
    d = results["tasks"].get("digits")
    if d:
        panels = [("base (null label)", d["base"]["_x"][:16])] + [(row["method"], row["_x"][:16]) for row in d["rows"]]
        plotting.save_image_panels(panels, out / "align_digits.png", nrow=4,
                                   suptitle="digits, class-3 reward: NFE 20 samples, same noise")
    c = results["tasks"].get("control")
    if c:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for k in sorted({r["denoise_steps"] for r in c["rows"]}):
            rr = [r for r in c["rows"] if r["denoise_steps"] == k]
            ax.scatter([k - 0.1] * len(rr), [r["bc"]["mean"] for r in rr], color="tab:blue",
                       label="behaviour-cloned" if k == min(r["denoise_steps"] for r in c["rows"]) else None)
            ax.scatter([k + 0.1] * len(rr), [r["reinflow"]["mean"] for r in rr], color="tab:red",
                       label="ReinFlow" if k == min(r["denoise_steps"] for r in c["rows"]) else None)
        ax.set_xlabel("denoising steps")
        ax.set_ylabel("mean return (Pendulum-v1)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        plotting.save_figure(fig, out / "align_control.png")


def _strip(o):
    if isinstance(o, dict):
        return {str(k): _strip(v) for k, v in o.items() if not str(k).startswith("_")}
    if isinstance(o, (list, tuple)):
        return [_strip(v) for v in o]
    if isinstance(o, Tensor):
        return o.tolist()
    return o


def run(a: argparse.Namespace) -> int:
    out, quick = a.out, a.quick
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; valid: {', '.join(TASKS)}")
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in available()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(available())}")
    searches = [s for s in a.searches.split(",") if s]
    t_start = time.perf_counter()
    cmd = a.command
    report = Report("Benchmark: align (alignment to rewards vs inference-time scaling)", cmd,
                    Timing(a.threads, warmup=0, repeats=1, statistic="single measurement",
                           clock="CPU seconds of the process; compute also in model-forward equivalents"),
                    quick=quick)
    results: Dict[str, Any] = {"command": cmd, "date": report.date, "machine": report.machine,
                               "quick": quick, "tasks": {}}
    for name in tasks:
        if name == "control":
            results["tasks"]["control"] = run_control(out, quick, a.seeds if not quick else 1,
                                                      [int(k) for k in a.denoise_steps.split(",")], a.rollouts)
            continue
        task = _make_task(name, out, quick, a)
        r = run_task(task, methods, searches, out, quick)
        r["n_search"] = task.n_search
        r["n_eval"] = task.n_eval
        results["tasks"][name] = r
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    lines = [f"Total: {results['seconds']} s wall.", "",
             "Every aligned model is sampled with the Euler ODE from held-out noise; rewards are means over "
             f"fresh samples; training compute is in model-forward equivalents (backward = 2 forwards). "
             f"Search methods run on the base model; their equal-compute budget per sample is "
             f"{SAMPLE_NFE} + (training compute) / {AMORTISE}.", ""]
    lines += _targets(results)
    lines += ["## Tables", ""]
    for name, r in results["tasks"].items():
        if name != "control":
            lines += _task_markdown(r)
    _plots(results, out)
    lines += ["![reward vs quality](align_frontier.png)", "", "![reward vs training compute](align_cost.png)", ""]
    if "digits" in results["tasks"]:
        lines += ["![digits samples](align_digits.png)", ""]
    if "control" in results["tasks"]:
        lines += ["![control](align_control.png)", ""]
    md = report.add(*lines).render()
    write_report(out, "align", md, {**_strip(results), "report": report.meta()})
    print(md)
    print(f"[bench align] wrote {out / 'align.md'} and {out / 'align.json'}")
    return 0


SUITE = register_suite("align", "alignment to rewards and preferences vs inference-time search at equal compute "
                       "(2D disc, digits class and ink rewards, Pendulum flow policies)", _arguments, run,
                       doc=__doc__.split("\n\n")[0])


def main(argv: Optional[List[str]] = None) -> int:
    """``straightflow bench align ARGS``."""
    return run_suite("align", argv)
