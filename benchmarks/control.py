"""``straightflow bench control``: inversion, editing and inverse problems on digits (+ scaling, adjoint).

Sections: (1) inversion reconstruction PSNR vs NFE for every deterministic solver on held-out
digits; (2) class-swap editing: distance to the source and target-class accuracy vs injected
steps; (3) per operator x method (FlowChef, DPS-style, FLAIR-like, PMRF): PSNR, SSIM,
classifier-FD (with the clean-vs-clean floor), NFE, wall time and peak memory; (4) the
inference-time scaling and adjoint sections (:mod:`.scaling`, :mod:`.adjoint`).

The digits model is trained once (class-conditional UNet, :func:`straightflow.runs.train_run`) on
the library's training split of digits (1438 images) and cached under ``<out>/runs/``
(:func:`.harness.cached_model`); the 359 held-out digits (``load_dataset("digits", split="test")``)
are split (fixed permutation) into the test images (the first ``--n``) and a disjoint validation set
(the last ``--n-val``).

Fair protocol for (3): each method's hyper-parameters are chosen per operator by a small grid
search maximising PSNR on the validation digits (own measurement noise draw), never on the test
images: DPS ``step_size`` (zeta, log grid 0.1..10), FlowChef ``step_size`` (units of 1/||A||^2,
0.25..2) x ``inner`` (1, 2, 3), FLAIR ``reg_weight`` (0.25, 0.5, 1). ``--no-tune`` uses the
defaults instead; ``--quick`` uses a 2-point grid per method.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from straightflow import data as sfdata, plotting
from straightflow.control import inverse, operators
from straightflow.control.editing import class_swap_edit, deterministic_solvers, inversion_roundtrip
from straightflow.metrics import classifier_fd, feature_extractor, psnr, ssim
from straightflow.solvers import get_solver
from .adjoint import bench_adjoint
from .harness import Report, Timing, cached_model, fmt, log_to, register_suite, run_suite, write_report
from .scaling import bench_scaling

LOG = log_to("control")
OPERATORS = ("inpaint_box", "inpaint_random", "sr2", "sr4", "deblur")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-run", default=None, help="a trained class-conditional digits run (else one is trained and cached)")
    p.add_argument("--train-steps", type=int, default=None, help="steps for the cached digits model (default 2500; quick 40)")
    p.add_argument("--noise", type=float, default=0.05, help="measurement noise sigma_y")
    p.add_argument("--n", type=int, default=None, help="test images per inverse problem (default 128; quick 8)")
    p.add_argument("--n-val", type=int, default=None,
                   help="held-out validation digits (disjoint from the test images) for tuning (default 32; quick 8)")
    p.add_argument("--no-tune", action="store_true",
                   help="skip the validation grid search; use the default hyper-parameters of every method")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps of FlowChef/DPS/FLAIR (default 50; quick 4)")
    p.add_argument("--mnist", action="store_true",
                   help="also run the inverse-problem table on MNIST 28x28 (needs ../shared/data; trains an "
                   "unconditional UNet on 8000 images, tests on held-out ones); writes control-mnist.md")
    p.add_argument("--mnist-only", action="store_true", help="run only the MNIST section (implies --mnist)")
    p.add_argument("--mnist-train-steps", type=int, default=None, help="steps of the MNIST UNet (default 1500; quick 10)")
    p.add_argument("--pmrf-steps", default=None, help="PMRF training steps predictor,flow (default 300,600; quick 4,4)")
    p.add_argument("--budget-steps", default=None,
                   help="step counts of the FlowChef vs DPS-style budget sweep (default 3,5,10,20,50; quick 2,4)")
    p.add_argument("--no-budget", action="store_true", help="skip the FlowChef vs DPS-style budget sweep")
    p.add_argument("--skip-others", action="store_true", help="skip the scaling/adjoint sections")


def bench_mnist(a, out: Path, quick: bool, noise: float, steps: int) -> List[str]:
    """Inverse problems on MNIST 28x28 with an unconditional pixel UNet trained here on the 8000 images
    of the library's training split (cached under ``<out>/runs``); test and validation images come from
    the 2000 held out (``split="test"``). FlowChef,
    DPS-style and FLAIR-like, tuned per operator like the digits table (PMRF: digits only, for time)."""
    if sfdata.mnist_path() is None:
        return ["## Inverse problems on MNIST", "", "skipped: mnist_test_10k.npz not found (../shared/data or "
                "STRAIGHTFLOW_DATA)", ""]
    n_train = 256 if quick else 8000
    # the images train_run(data="mnist", n=n_train, seed=0) trains on, and the split it never sees
    x_train = sfdata.load_dataset("mnist", n=n_train, seed=0, split="train").x
    held = sfdata.load_dataset("mnist", split="test").x
    n = 4 if quick else min(a.n or 64, 64)
    n_val = 4 if quick else (a.n_val or 32)
    _, ti, vi = held_out_split(held.shape[0], n, n_val, seed=1)
    x_test, x_val = held[ti], held[vi]
    x_ref = x_train[: (64 if quick else 1000)]
    t_steps = a.mnist_train_steps or (10 if quick else 1500)
    recipe = {"data": "mnist", "n": n_train, "steps": t_steps, "conditional": False, "base_channels": 16,
              "batch_size": 64, "lr": 1e-3, "warmup": min(100, t_steps // 5), "lr_schedule": "cosine",
              "ema": 0.999 if t_steps > 500 else 0.9, "seed": 0, "ckpt_every": 500}
    model, _, how = cached_model(out, f"mnist-unet-{t_steps}", recipe, log=LOG, progress=not quick)
    model = model.eval()
    print("[bench control] MNIST inverse problems", flush=True)
    rows, md, panels, extra = bench_inverse(model, x_test, x_train, x_ref, quick, noise, steps, progress=False,
                                           x_val=None if a.no_tune else x_val, tune=not a.no_tune,
                                           methods=("flowchef", "dps", "flair"), extractor="mnist")
    for opn, pan in panels.items():
        plotting.save_image_panels(pan, out / f"control-mnist-{opn}.png", nrow=4, suptitle=f"MNIST {opn}, noise {noise}")
    budget_lines, budget = [], None
    if not a.no_budget and not a.no_tune:
        budget_lines, budget = _budget_section(model, x_test, x_val, noise, quick, _budget_steps(a, quick), out,
                                               "control-mnist-budget", "MNIST")
    (out / "control-mnist.json").write_text(json.dumps({"rows": rows, **extra, "budget": budget}, indent=2, default=float))
    return (["## Inverse problems on MNIST (28x28)", "",
             f"Unconditional pixel UNet ({sum(p.numel() for p in model.parameters()):,} parameters), {how}; "
             f"{steps} sampling steps; test images: {n} of the 2000 MNIST images held out from training, validation: "
             f"{n_val} others. FD in the `mnist` extractor's features (a proxy classifier). PMRF is run on digits only "
             "(its per-operator training does not fit this section's CPU budget).", "", md, ""]
            + [f"![{o}](control-mnist-{o}.png)" for o in panels] + [""] + budget_lines)


def _budget_steps(a, quick: bool) -> List[int]:
    if a.budget_steps:
        return [int(v) for v in a.budget_steps.split(",")]
    return [2, 4] if quick else list(BUDGET_STEPS)


def _digits_split():
    """The digits the cached model trains on (the library's training split) and the held-out ones."""
    train, test = sfdata.load_dataset("digits", split="train"), sfdata.load_dataset("digits", split="test")
    return train, test.x, test.y


def held_out_split(n_held: int, n: int, n_val: int, seed: int = 0) -> tuple:
    """Fixed permutation of the held-out digits: test images ``perm[:n]``, validation images (for
    tuning) ``perm[n_held - n_val:]``; disjoint, and the test set does not depend on ``n_val``."""
    if n < 1 or n_val < 0 or n + n_val > n_held:
        raise ValueError(f"--n {n} + --n-val {n_val} must be at most the {n_held} held-out digits (n >= 1)")
    perm = torch.randperm(n_held, generator=torch.Generator().manual_seed(seed))
    return perm, perm[:n], perm[n_held - n_val:]


def _model(a, out: Path, quick: bool):
    steps = a.train_steps or (40 if quick else 2500)
    recipe = {"data": "digits", "steps": steps, "batch_size": 128, "lr": 1e-3,
              "warmup": min(200, steps // 5), "lr_schedule": "cosine", "ema": 0.999 if steps > 500 else 0.9,
              "seed": 0, "ckpt_every": 500}
    model, run_dir, how = cached_model(out, f"digits-{steps}", recipe, run=a.model_run, log=LOG, progress=not quick)
    if a.model_run:
        how += " (test images may overlap its training data)"
    return model, run_dir, how


def bench_inversion(model, x, y, quick: bool) -> tuple:

    solvers = ["euler", "midpoint"] if quick else deterministic_solvers()
    nfes = [4] if quick else [4, 8, 16, 32]
    rows = []
    for s in solvers:
        spec = get_solver(s)
        for nfe in nfes:
            steps = spec.steps_for_nfe(nfe)
            if spec.nfe(steps) > nfe:
                continue
            back, total = inversion_roundtrip(model, x, s, steps, cond={"y": y})
            rows.append({"solver": spec.name, "nfe_each_way": total // 2, "steps": steps,
                         "psnr": psnr(back.clamp(-1, 1), x)})
    md = ["| solver | NFE each way | steps | reconstruction PSNR dB |", "|---|---:|---:|---:|"]
    md += [f"| {r['solver']} | {r['nfe_each_way']} | {r['steps']} | {r['psnr']:.2f} |" for r in rows]
    return rows, "\n".join(md)


def bench_editing(model, x, y, quick: bool, steps: int = 20) -> tuple:

    clf = feature_extractor("digits")
    tgt = (y + 5) % 10
    ks = [0, steps // 4, steps // 2, 3 * steps // 4]
    rows, grids = [], []
    for k in ks:
        res = class_swap_edit(model, x, y, tgt, solver="midpoint", steps=steps, inject=k)
        with torch.no_grad():
            acc = (clf(res.x.float()).argmax(1) == tgt).float().mean().item()
        rms = (res.x - x).pow(2).flatten(1).mean(1).sqrt().mean().item()
        rows.append({"inject": k, "nfe": res.nfe, "rms_to_source": rms, "target_accuracy": acc})
        grids.append((f"inject {k} (NFE {res.nfe})", res.x[:16]))
    md = ["| injected steps K | NFE (inversion + generation) | RMS distance to source | classified as target |",
          "|---:|---:|---:|---:|"]
    md += [f"| {r['inject']} | {r['nfe']} | {r['rms_to_source']:.3f} | {100 * r['target_accuracy']:.0f}% |" for r in rows]
    return rows, "\n".join(md), grids


DEFAULT_PARAMS: Dict[str, Dict[str, float]] = {"flowchef": {"step_size": 1.0, "inner": 1},
                                               "dps": {"step_size": 1.0}, "flair": {"reg_weight": 0.5}}


def tuning_grid(quick: bool) -> Dict[str, List[Dict[str, float]]]:
    """Per-method candidate hyper-parameters (2 points each with ``quick``)."""
    if quick:
        return {"flowchef": [{"step_size": 0.5, "inner": 1}, {"step_size": 1.0, "inner": 1}],
                "dps": [{"step_size": 0.3}, {"step_size": 3.0}],
                "flair": [{"reg_weight": 0.25}, {"reg_weight": 0.5}]}
    return {"flowchef": [{"step_size": s, "inner": k} for k in (1, 2, 3) for s in (0.25, 0.5, 1.0, 2.0)],
            "dps": [{"step_size": z} for z in (0.1, 0.3, 1.0, 3.0, 10.0)],
            "flair": [{"reg_weight": w} for w in (0.25, 0.5, 1.0)]}


def _kw(method: str, params: Dict[str, float], noise: float) -> Dict[str, float]:
    return {**params, "sigma_y": noise} if method == "flair" else dict(params)


def _pstr(params: Dict[str, float]) -> str:
    names = {"step_size": "s", "inner": "inner", "reg_weight": "w"}
    return ", ".join(f"{names.get(k, k)}={v:g}" for k, v in params.items())


def tune_operator(model, op, x_val: Tensor, noise: float, steps: int, grid: Dict[str, List[Dict[str, float]]],
                  seed: int = 8) -> tuple:
    """Grid search on validation images: for each method the candidate with the highest validation
    PSNR (its own measurement-noise draw ``seed``). Returns ``(best params per method, all trials)``."""

    y = op.measure(x_val, noise, torch.Generator().manual_seed(seed))
    best, trials = {}, []
    for m, cands in grid.items():
        scores = []
        for params in cands:
            res = inverse.restore(m, model, op, y, memory=False, steps=steps, **_kw(m, params, noise))
            val = psnr(res.x.clamp(-1, 1), x_val)
            scores.append(val)
            trials.append({"operator": op.name, "method": m, "params": params, "val_psnr": val, "seconds": res.seconds})
        i = max(range(len(cands)), key=lambda j: scores[j])
        best[m] = {"params": cands[i], "val_psnr": scores[i]}
    return best, trials


def bench_inverse(model, x_test, x_train, x_ref, quick: bool, noise: float, steps: int, progress: bool,
                  pmrf_steps=None, x_val: Optional[Tensor] = None, tune: bool = True,
                  methods: Sequence[str] = ("flowchef", "dps", "flair", "pmrf"), extractor: str = "digits") -> tuple:

    shape = tuple(x_test.shape[1:])
    ops = list(OPERATORS)
    methods = list(methods)
    pm_steps, flow_steps = pmrf_steps or ((4, 4) if quick else (300, 600))
    pmrf_flow_steps = 2 if quick else 10
    floor = classifier_fd(x_ref, x_test, extractor=extractor)
    grid = {m: g for m, g in tuning_grid(quick).items() if m in methods}
    do_tune = tune and x_val is not None
    rows, panels, trials, chosen = [], {}, [], {}
    for opn in ops:
        op = operators.make_operator(opn, shape)
        if do_tune:
            t0 = time.perf_counter()
            best, tr = tune_operator(model, op, x_val, noise, steps, grid)
            trials += tr
            print(f"[bench control] {opn:14s} tuned on {x_val.shape[0]} validation images in "
                  f"{time.perf_counter() - t0:.0f} s: " + "; ".join(f"{m} {_pstr(b['params'])} ({b['val_psnr']:.2f} dB)"
                                                               for m, b in best.items()), flush=True)
        else:
            best = {m: {"params": dict(p), "val_psnr": None} for m, p in DEFAULT_PARAMS.items() if m in methods}
        chosen[opn] = best
        y = op.measure(x_test, noise, torch.Generator().manual_seed(7))
        panels[opn] = [("original", x_test[:16]), ("A^+ y", op.pinv(y)[:16].clamp(-1, 1))]
        for m in methods:
            info_extra = {}
            if m == "pmrf":
                t0 = time.perf_counter()
                net = inverse.PMRF(op, sigma_y=noise).fit(x_train, pm_steps=pm_steps, flow_steps=flow_steps, seed=0,
                                                          progress=progress)
                info_extra["train_seconds"] = time.perf_counter() - t0
                res = inverse.restore("pmrf", net, op, y, steps=pmrf_flow_steps)
                params, val = {"flow_steps": pmrf_flow_steps}, None
            else:
                params, val = best[m]["params"], best[m]["val_psnr"]
                res = inverse.restore(m, model, op, y, steps=steps, **_kw(m, params, noise))
            xr = res.x.clamp(-1, 1)
            row = {"operator": opn, "method": m, "params": params, "val_psnr": val,
                   "psnr": psnr(xr, x_test), "ssim": ssim(xr, x_test),
                   "fd": classifier_fd(xr, x_ref, extractor=extractor), "fd_floor": floor, "nfe": res.nfe, "seconds": res.seconds,
                   "peak_mib": None if res.peak_bytes is None else res.peak_bytes / 2**20, **info_extra}
            rows.append(row)
            panels[opn].append((f"{m} {row['psnr']:.1f} dB", xr[:16]))
            print(f"[bench control] {opn:14s} {m:8s} PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f} "
                  f"FD {row['fd']:.1f} NFE {row['nfe']} {row['seconds']:.2f} s {fmt(row['peak_mib'])} MiB "
                  f"({_pstr(params)})", flush=True)
    if do_tune:
        how = (f"Hyper-parameters chosen per operator by grid search on {x_val.shape[0]} held-out validation images "
               "(disjoint from the test images, own noise draw), maximising validation PSNR: "
               + "; ".join(f"{m} " + " / ".join("{" + _pstr(p) + "}" for p in g) for m, g in grid.items()) + ".")
    else:
        how = ("No tuning (`--no-tune`): default hyper-parameters "
               + "; ".join(f"{m} {_pstr(p)}" for m, p in DEFAULT_PARAMS.items()) + ".")
    md = [f"Noise sigma_y = {noise}; {x_test.shape[0]} held-out test images; classifier-FD against "
          f"{x_ref.shape[0]} clean training images ('{extractor}' features), clean-vs-clean floor {floor:.2f}. " + how +
          " FlowChef `s` is in units of 1/||A||^2; DPS `s` is zeta (step zeta / ||y - A x1_hat||).", "",
          "| operator | method | hyper-parameters | val PSNR | PSNR dB | SSIM | FD | NFE | time s | peak MiB | "
          "time / DPS | memory / DPS |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = next(q for q in rows if q["operator"] == r["operator"] and q["method"] == "dps")
        tr = r["seconds"] / d["seconds"]
        mr = (r["peak_mib"] / d["peak_mib"]) if (r["peak_mib"] is not None and d["peak_mib"]) else None
        extra = f" (+{r['train_seconds']:.0f} s training)" if "train_seconds" in r else ""
        md.append(f"| {r['operator']} | {r['method']} | {_pstr(r['params'])} | {fmt(r['val_psnr'])} | {r['psnr']:.2f} | "
                  f"{r['ssim']:.3f} | {r['fd']:.2f} | {r['nfe']} | "
                  f"{r['seconds']:.2f}{extra} | {fmt(r['peak_mib'])} | {tr:.2f}x | {fmt(mr)}{'x' if mr is not None else ''} |")
    md += ["", "FlowChef vs DPS-style (test images):", "",
           "| operator | FlowChef PSNR | DPS PSNR | difference dB | FlowChef >= DPS | time ratio | memory ratio |",
           "|---|---:|---:|---:|---|---:|---:|"]
    summary = []
    for opn in ops:
        f = next(q for q in rows if q["operator"] == opn and q["method"] == "flowchef")
        d = next(q for q in rows if q["operator"] == opn and q["method"] == "dps")
        mr = (f["peak_mib"] / d["peak_mib"]) if (f["peak_mib"] is not None and d["peak_mib"]) else None
        s = {"operator": opn, "flowchef_psnr": f["psnr"], "dps_psnr": d["psnr"], "diff_db": f["psnr"] - d["psnr"],
             "flowchef_ge_dps": f["psnr"] >= d["psnr"], "time_ratio": f["seconds"] / d["seconds"], "memory_ratio": mr}
        summary.append(s)
        md.append(f"| {opn} | {s['flowchef_psnr']:.2f} | {s['dps_psnr']:.2f} | {s['diff_db']:+.2f} | "
                  f"{'yes' if s['flowchef_ge_dps'] else 'no'} | {s['time_ratio']:.2f}x | {fmt(mr)}{'x' if mr is not None else ''} |")
    extra = {"tuning": {"tuned": do_tune, "grid": grid if do_tune else None, "defaults": DEFAULT_PARAMS,
                        "n_val": None if x_val is None else int(x_val.shape[0]), "chosen": chosen, "trials": trials},
             "flowchef_vs_dps": summary}
    return rows, "\n".join(md), panels, extra


BUDGET_STEPS = (3, 5, 10, 20, 50)


def bench_budget(model, x_test: Tensor, x_val: Tensor, noise: float, quick: bool,
                 steps_list: Sequence[int] = BUDGET_STEPS, ops: Optional[Sequence[str]] = None) -> tuple:
    """FlowChef vs DPS-style across compute budgets: for every sampling-step count both methods are
    re-tuned on the validation images (same grid as the main table), then run once on the test
    images (same measurement noise draw as the table). Returns ``(rows, markdown, plot panels,
    summary)``; the summary compares each method's best point (chosen on validation) and, for every
    DPS budget, the best FlowChef point (chosen on validation) that takes no more wall time."""

    ops = list(ops or OPERATORS)
    grid = {m: g for m, g in tuning_grid(quick).items() if m in ("flowchef", "dps")}
    shape = tuple(x_test.shape[1:])
    rows, panels, summary = [], {}, []
    for opn in ops:
        op = operators.make_operator(opn, shape)
        y = op.measure(x_test, noise, torch.Generator().manual_seed(7))
        t0 = time.perf_counter()
        for st in steps_list:
            best, _ = tune_operator(model, op, x_val, noise, int(st), grid)
            for m in ("flowchef", "dps"):
                res = inverse.restore(m, model, op, y, memory=False, steps=int(st), **best[m]["params"])
                rows.append({"operator": opn, "method": m, "steps": int(st), "nfe": res.nfe, "params": best[m]["params"],
                             "val_psnr": best[m]["val_psnr"], "psnr": psnr(res.x.clamp(-1, 1), x_test),
                             "seconds": res.seconds})
        mine = [r for r in rows if r["operator"] == opn]
        panels[opn] = {m: ([r["seconds"] for r in mine if r["method"] == m], [r["psnr"] for r in mine if r["method"] == m])
                       for m in ("flowchef", "dps")}
        fc = [r for r in mine if r["method"] == "flowchef"]
        dp = [r for r in mine if r["method"] == "dps"]
        bf, bd = max(fc, key=lambda r: r["val_psnr"]), max(dp, key=lambda r: r["val_psnr"])
        matched = []
        for d in dp:
            cands = [r for r in fc if r["seconds"] <= d["seconds"]]
            if cands:
                f = max(cands, key=lambda r: r["val_psnr"])
                matched.append({"dps_steps": d["steps"], "dps_psnr": d["psnr"], "flowchef_steps": f["steps"],
                                "flowchef_psnr": f["psnr"], "ge": f["psnr"] >= d["psnr"]})
        summary.append({"operator": opn, "best_flowchef": bf, "best_dps": bd, "diff_db": bf["psnr"] - bd["psnr"],
                        "equal_time": matched})
        print(f"[bench control] budget {opn:14s} {time.perf_counter() - t0:.0f} s: best FlowChef {bf['psnr']:.2f} dB "
              f"({bf['steps']} steps, {bf['seconds']:.2f} s) vs best DPS {bd['psnr']:.2f} dB ({bd['steps']} steps, "
              f"{bd['seconds']:.2f} s); FlowChef >= DPS at equal-or-lower time for "
              f"{sum(q['ge'] for q in matched)}/{len(dp)} DPS budgets", flush=True)
    head = " | ".join(f"{k} steps" for k in steps_list)
    md = [f"| operator | method | {head} |", "|---|---|" + "---:|" * len(steps_list)]
    for opn in ops:
        for m in ("flowchef", "dps"):
            cells = [next(r for r in rows if r["operator"] == opn and r["method"] == m and r["steps"] == int(k))
                     for k in steps_list]
            md.append(f"| {opn} | {m} | " + " | ".join(f"{c['psnr']:.2f} ({c['seconds']:.2f} s)" for c in cells) + " |")
    md += ["", "| operator | best FlowChef (steps, PSNR, time) | best DPS-style (steps, PSNR, time) | difference dB | "
           "FlowChef >= DPS at equal-or-lower time |", "|---|---|---|---:|---|"]
    for q in summary:
        bf, bd = q["best_flowchef"], q["best_dps"]
        eq = ", ".join(f"{e['dps_steps']}:{'yes' if e['ge'] else 'no'}" for e in q["equal_time"]) or "n/a"
        md.append(f"| {q['operator']} | {bf['steps']}, {bf['psnr']:.2f} dB, {bf['seconds']:.2f} s | {bd['steps']}, "
                  f"{bd['psnr']:.2f} dB, {bd['seconds']:.2f} s | {q['diff_db']:+.2f} | "
                  f"{sum(e['ge'] for e in q['equal_time'])}/{len(q['equal_time'])} DPS budgets ({eq}) |")
    return rows, "\n".join(md), panels, summary


def _budget_section(model, x_test, x_val, noise, quick, steps_list, out: Path, stem: str, title: str) -> tuple:

    rows, md, panels, summary = bench_budget(model, x_test, x_val, noise, quick, steps_list)
    plotting.save_curve_panels(panels, out / f"{stem}.png", "wall time per batch (s)", "test PSNR (dB)",
                               suptitle=f"{title}: PSNR vs time, sampling steps {', '.join(map(str, steps_list))}")
    lines = [f"## {title}: FlowChef vs DPS-style across budgets", "",
             f"Both methods re-tuned on the validation images at every step count ({', '.join(map(str, steps_list))}; "
             f"same grids as above), then run once on the {x_test.shape[0]} test images; cells are test PSNR (wall time "
             "for the batch). 'Best' is the point with the highest validation PSNR; the last column asks, for each DPS "
             "step count, whether the best FlowChef point (by validation) that takes no more wall time reaches the "
             "DPS point's test PSNR (DPS steps:yes/no).", "", md, "", f"![budget]({stem}.png)", ""]
    return lines, {"rows": rows, "summary": summary}


def _others(out: Path, quick: bool) -> List[str]:
    return [bench_scaling(str(out), quick), "", bench_adjoint(str(out), quick), ""]


def _mnist_section(a, out: Path, quick: bool, steps: int) -> List[str]:
    t0 = time.perf_counter()
    sec = bench_mnist(a, out, quick, a.noise, steps)
    report = Report("Benchmark: control on MNIST (inverse problems)", a.command, _timing(a.threads), quick=quick)
    report.add(f"Total: {time.perf_counter() - t0:.0f} s.", "", *sec)
    write_report(out, "control-mnist", report.render())
    return sec


def _timing(threads: int) -> Timing:
    return Timing(threads, warmup=0, repeats=1, statistic="single measurement",
                  note="Peak memory: a second identical run under torch.profiler.")


def run(a: argparse.Namespace) -> int:
    quick, out = a.quick, a.out
    if a.mnist_only:
        _mnist_section(a, out, quick, a.sample_steps or (4 if quick else 50))
        print(f"[bench control] wrote {out / 'control-mnist.md'}")
        return 0
    t_start = time.perf_counter()
    torch.manual_seed(0)
    n = a.n or (8 if quick else 128)
    steps = a.sample_steps or (4 if quick else 50)

    pmrf = tuple(int(v) for v in a.pmrf_steps.split(",")) if a.pmrf_steps else None
    model, run_dir, how = _model(a, out, quick)
    train, x_held, y_held = _digits_split()
    n_val = a.n_val if a.n_val is not None else (8 if quick else 32)
    perm, test_idx, val_idx = held_out_split(x_held.shape[0], n, n_val)
    x_test = x_held[test_idx]
    x_val = x_held[val_idx] if n_val > 0 else None  # disjoint from x_test
    n_inv = 8 if quick else 64
    x_inv, y_inv = x_held[perm[:n_inv]], y_held[perm[:n_inv]]
    x_ref = train.x[torch.randperm(train.x.shape[0], generator=torch.Generator().manual_seed(1))[: max(n, 64) * 4]]

    cmd = a.command
    report = Report("Benchmark: control (inversion, editing, inverse problems)", cmd, _timing(a.threads), quick=quick)
    lines = [f"Model: class-conditional UNet on digits (8x8), {how} (`{run_dir}`). Test images: held-out digits "
             f"never seen in training. {'QUICK MODE: tiny settings, numbers not meaningful.' if quick else ''}", ""]
    results: Dict[str, object] = {"command": cmd, "date": report.date, "machine": report.machine,
                                  "quick": quick, "run": run_dir}

    print("[bench control] 1/4 inversion", flush=True)
    inv_rows, inv_md = bench_inversion(model, x_inv, y_inv, quick)
    results["inversion"] = inv_rows
    curves = {}
    for r in inv_rows:
        xs, ys = curves.setdefault(r["solver"], ([], []))
        xs.append(r["nfe_each_way"])
        ys.append(r["psnr"])
    plotting.save_curves(curves, out / "control-inversion.png", "NFE each way", "reconstruction PSNR (dB)", logy=False,
                         title="inversion round trip on held-out digits")
    lines += ["## Inversion: reconstruction PSNR vs NFE", "",
              f"{n_inv} held-out digits inverted with their class and regenerated (`sample(invert(x))`, same solver "
              "and steps both ways).", "", inv_md, "", "![inversion](control-inversion.png)", ""]

    print("[bench control] 2/4 class-swap editing", flush=True)
    ed_rows, ed_md, grids = bench_editing(model, x_inv, y_inv, quick, steps=4 if quick else 20)
    results["editing"] = ed_rows
    plotting.save_image_panels([("source", x_inv[:16])] + grids, out / "control-edit.png", nrow=4,
                               suptitle=f"class swap c -> c+5 (mod 10), midpoint, {4 if quick else 20} steps")
    lines += ["## Class-swap editing (c -> c + 5 mod 10), structure vs injected steps", "",
              "Invert with the source class to t_K, regenerate with the target class (midpoint). "
              "More injected steps keep more of the source (lower distance) at a lower edit rate.", "",
              ed_md, "", "![edit](control-edit.png)", ""]

    print("[bench control] 3/4 inverse problems", flush=True)
    ip_rows, ip_md, panels, ip_extra = bench_inverse(model, x_test, train.x, x_ref, quick, a.noise, steps,
                                                       progress=False, pmrf_steps=pmrf, x_val=x_val,
                                                       tune=not a.no_tune)
    results["inverse"] = ip_rows
    results.update(ip_extra)
    for opn, pan in panels.items():
        plotting.save_image_panels(pan, out / f"control-restore-{opn}.png", nrow=4, suptitle=f"{opn}, noise {a.noise}")
    lines += ["## Inverse problems", "",
              f"FlowChef, DPS-style and FLAIR-like: {steps} steps of the digits model run unconditionally (null "
              f"class). PMRF: its own predictor + flow per operator, {'+'.join(map(str, pmrf or ((4, 4) if quick else (300, 600))))} training steps, "
              f"{2 if quick else 10} Euler steps (NFE includes the predictor call). Time: one run; peak memory: a second "
              "identical run under torch.profiler (live tensor bytes allocated during the call).", "", ip_md, ""]
    lines += [f"![{o}](control-restore-{o}.png)" for o in panels] + [""]
    if not a.no_budget and x_val is not None and not a.no_tune:
        print("[bench control] 3b/4 FlowChef vs DPS-style across budgets", flush=True)
        b_lines, results["budget"] = _budget_section(model, x_test, x_val, a.noise, quick, _budget_steps(a, quick), out,
                                                     "control-budget", "Digits")
        lines += b_lines

    if a.mnist:
        lines += _mnist_section(a, out, quick, steps)
    if not a.skip_others:
        print("[bench control] 4/4 scaling and adjoint sections", flush=True)
        lines += _others(out, quick)
    total = time.perf_counter() - t_start
    lines += [f"Total time: {total:.0f} s.", ""]
    results["seconds"] = total
    md = report.add(*lines).render()
    report.write(out, "control", results)
    print(md)
    return 0


SUITE = register_suite("control", "inversion, editing, inverse problems, inference-time scaling, adjoint (digits, MNIST)",
                       _arguments, run, doc=__doc__)


def main(argv: Optional[List[str]] = None) -> int:
    """``straightflow bench control ARGS``."""
    return run_suite("control", argv)
