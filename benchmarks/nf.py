"""``straightflow bench nf``: normalizing flows — TarFlow likelihood against zuko, GS-Jacobi against sequential.

Likelihood: a TarFlow (4 blocks, unconditional) is trained on the digits' training split (8x8, 17 grey
levels, uniform dequantisation, no Gaussian noise) by the library's trainer; zuko's MAF and NSF (the peer
library, installed with ``pip install --no-deps zuko``) are trained on the same data, dequantisation,
batch size and learning rate for the same CPU seconds, sized to a comparable parameter count. All three are
scored by held-out bits/dim with the same uniform draws: ``bpd = (-log p(x + u) - n log Delta) / (n log 2)``,
``Delta = 2/16``.

Sampling: the trained TarFlow is inverted from the same prior noise by sequential inversion (KV cache, the
reference) and by GS-Jacobi (tolerance x segment sweep, and the plan chosen by the paper's CRM/IGM
metrics on training data): wall time (median), transformer calls, max |difference|, speed-up; FD (digits
classifier, with the training-vs-held-out floor) of both at one setting.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import straightflow as sf
from straightflow import nf
from straightflow.metrics.frechet import classifier_fd
from straightflow.models import count_parameters

from .harness import Report, Timing, fmt, log_to, ratio, register_suite, run_suite, table

LEVELS = 17  # the digits: integers 0..16 mapped to [-1, 1]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="TarFlow training steps (default 300; quick 4)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (TarFlow and the peers)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (TarFlow and the peers)")
    p.add_argument("--patch-size", type=int, default=2, help="TarFlow patch (2: 16 tokens of 4; 1: 64 tokens)")
    p.add_argument("--width", type=int, default=64, help="TarFlow transformer width")
    p.add_argument("--batches", default=None, help="sampling batch sizes for the timing sweep (default 1,16; quick 1)")
    p.add_argument("--tols", default=None, help="GS-Jacobi tolerances (default 1e-2,1e-3,1e-4,0; quick 1e-2,0)")
    p.add_argument("--segments", default=None, help="GS-Jacobi segment counts (default 1,4; quick 1)")
    p.add_argument("--fd-n", type=int, default=None, help="samples for FD (default 300; quick 20)")
    p.add_argument("--no-peers", action="store_true", help="skip the zuko peers")


def _clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def _digits():
    return sf.load_dataset("digits", split="train"), sf.load_dataset("digits", split="test")


def _bpd(log_prob, x: torch.Tensor, seed: int = 0) -> float:
    """Held-out bits/dim with uniform dequantisation (the same draws for every model: ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    delta = 2.0 / (LEVELS - 1)
    u = (torch.rand(x.shape, generator=g) - 0.5) * delta
    n = x[0].numel()
    with torch.no_grad():
        lp = log_prob(x + u)
    return float(((-lp / n - math.log(delta)) / math.log(2)).mean())


def _train_tarflow(a, out: Path, steps: int, quick: bool, log):
    train, _ = _digits()
    name = f"tarflow-p{a.patch_size}-w{a.width}-s{steps}-b{a.batch_size}"
    run = out / "runs" / name
    timing = run / "bench_train_time.json"
    cfg = nf.default_nf_config(train.shape, None, width=a.width, patch_size=a.patch_size, noise_std=0.0,
                               levels=LEVELS, blocks=4, layers=1 if quick else 2)
    t0 = time.process_time()
    res = nf.train_nf("digits", run, model_config=cfg, steps=steps, conditional=False, batch_size=a.batch_size,
                      lr=a.lr, warmup=min(50, steps), ema_decay=0.0 if quick else 0.99, ckpt_every=max(1, steps // 4),
                      progress=not quick)
    cpu = time.process_time() - t0
    if res.resumed_from is not None and res.resumed_from >= steps and timing.is_file():
        cpu, how = json.loads(timing.read_text())["cpu_s"], "cached"
    else:
        timing.write_text(json.dumps({"cpu_s": cpu}))
        how = "trained now"
    log(f"TarFlow {name}: {how}, {cpu:.0f} CPU s")
    return sf.load(run), run, cpu, how


def _peer(kind: str, dim: int, target: int):
    """A zuko MAF/NSF of ``transforms=4`` whose hidden width brings it closest to ``target`` parameters."""
    import zuko

    best = None
    for h in (32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512):
        f = (zuko.flows.MAF if kind == "MAF" else zuko.flows.NSF)(dim, 0, transforms=4, hidden_features=[h, h])
        n = sum(p.numel() for p in f.parameters())
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (f, n, h)
    return best


def _train_peer(kind: str, x: torch.Tensor, cpu_budget: float, a, target: int, seed: int = 0):
    torch.manual_seed(seed)
    flow, n_params, hidden = _peer(kind, x.shape[1], target)
    opt = torch.optim.Adam(flow.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(seed)
    delta = 2.0 / (LEVELS - 1)
    t0, steps = time.process_time(), 0
    while time.process_time() - t0 < cpu_budget:
        idx = torch.randint(0, x.shape[0], (a.batch_size,), generator=g)
        xb = x[idx] + (torch.rand((a.batch_size, x.shape[1]), generator=g) - 0.5) * delta
        loss = -flow().log_prob(xb).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return flow, n_params, hidden, steps, time.process_time() - t0


def _likelihood(a, model, cpu: float, quick: bool, log) -> Dict[str, Any]:
    train, test = _digits()
    rows = []
    n_tf = count_parameters(model)
    bpd_tf = _bpd(lambda v: model.log_prob(v), test.x)
    rows.append({"model": "TarFlow (straightflow, 4 blocks)", "params": n_tf, "cpu_s": cpu, "bpd": bpd_tf,
                 "note": f"patch {a.patch_size}, width {a.width}"})
    if not a.no_peers:
        try:
            import zuko  # noqa: F401
        except ImportError:
            log("zuko is not installed (pip install --no-deps zuko): peers skipped")
        else:
            flat = train.x.reshape(len(train), -1)
            for kind in ("MAF", "NSF"):
                flow, n, h, steps, used = _train_peer(kind, flat, 0.5 if quick else cpu, a, n_tf)
                bpd = _bpd(lambda v: flow().log_prob(v.reshape(len(v), -1)), test.x)
                rows.append({"model": f"zuko {kind} (4 transforms, hidden [{h}, {h}])", "params": n, "cpu_s": used,
                             "bpd": bpd, "note": f"{steps} steps"})
                log(f"zuko {kind}: {bpd:.4f} bpd, {n} params, {steps} steps")
    return {"rows": rows, "n_test": len(test)}


def _sampling(a, model, quick: bool, log) -> Dict[str, Any]:
    train, test = _digits()
    metrics = nf.block_metrics(model, train.x[:256])
    plan = nf.plan_from_metrics(metrics)
    plan_front = nf.plan_from_metrics(metrics, front=True)
    tols = [float(t) for t in (a.tols or ("1e-2,0" if quick else "1e-2,1e-3,1e-4,0")).split(",")]
    segs = [int(s) for s in (a.segments or ("1" if quick else "1,4")).split(",")]
    batches = [int(v) for v in (a.batches or ("1" if quick else "1,16")).split(",")]
    reps = 1 if quick else 3
    rows: List[Dict[str, Any]] = []
    for b in batches:
        z = torch.randn((b, *model.sample_shape), generator=torch.Generator().manual_seed(b))

        def go(**kw):
            return nf.sample_nf(model, z, solver=kw.pop("solver", "gs-jacobi"), denoise=False, **kw)

        ref = go(solver="sequential")
        settings = [(f"tol {t:g}, {s} segment(s)", {"tol": t, "segments": s}) for t in tols for s in segs]
        settings += [(f"tol {t:g}, CRM/IGM plan", {"tol": t, "plan": plan}) for t in tols]
        settings += [(f"tol {t:g}, CRM/IGM plan + moving front", {"tol": t, "plan": plan_front}) for t in tols]
        seq_times: List[float] = []
        for label, kw in settings:
            # interleaved: sequential and this setting alternate, the speed-up is the median of the paired ratios
            go(solver="sequential"), go(**dict(kw))  # warm-up
            ts, tj = [], []
            for _ in range(reps):
                ts.append(_clock(lambda: go(solver="sequential")))
                tj.append(_clock(lambda: go(**dict(kw))))
            seq_times += ts
            o = go(**dict(kw))
            rows.append({"batch": b, "setting": label, "ms": 1e3 * statistics.median(tj),
                         "speedup": statistics.median([x / y for x, y in zip(ts, tj)]), "calls": o.calls,
                         "max_diff": float((o.x - ref.x).abs().max()), "iterations": o.stats.iterations})
        rows.insert(len(rows) - len(settings), {"batch": b, "setting": "sequential (reference)",
                                                 "ms": 1e3 * statistics.median(seq_times), "speedup": 1.0,
                                                 "calls": ref.calls, "max_diff": 0.0})
        log(f"sampling sweep at batch {b} done")
    # FD of both at one setting, with the floor
    n = a.fd_n or (20 if quick else 300)
    n = min(n, len(test))
    z = torch.randn((n, *model.sample_shape), generator=torch.Generator().manual_seed(123))
    seq = nf.sample_nf(model, z, solver="sequential", denoise=False).x.clamp(-1, 1)
    jac = nf.sample_nf(model, z, solver="gs-jacobi", tol=1e-3, plan=plan, denoise=False).x.clamp(-1, 1)
    fd = {"n": n, "sequential": classifier_fd(seq, test.x[:n]), "gs-jacobi (tol 1e-3, plan)": classifier_fd(jac, test.x[:n]),
          "floor (training vs held-out)": classifier_fd(train.x[:n], test.x[:n]), "max_diff": float((seq - jac).abs().max())}
    return {"rows": rows, "metrics": metrics, "plan": [p.__dict__ for p in plan], "fd": fd}


def run(a: argparse.Namespace) -> int:
    quick, out = a.quick, a.out
    log = log_to("nf")
    steps = a.steps or (4 if quick else 300)
    model, run_dir, cpu, how = _train_tarflow(a, out, steps, quick, log)
    model.eval()
    lik = _likelihood(a, model, cpu, quick, log)
    smp = _sampling(a, model, quick, log)
    report = Report("Benchmark: normalizing flows (TarFlow likelihood, GS-Jacobi sampling)", a.command,
                    Timing(a.threads, warmup=1, repeats=1 if quick else 3,
                           note="Sampling: sequential and each GS-Jacobi setting run alternately; the speed-up is "
                                "the median of the paired ratios. Training budgets are CPU seconds (time.process_time)."), quick=quick)
    report.add(f"TarFlow run: `{run_dir}` ({how}, {steps} steps, batch {a.batch_size}, lr {a.lr}). Data: digits 8x8, "
               f"training split; held-out bits/dim on the {lik['n_test']} held-out digits (17 levels, uniform "
               "dequantisation, identical draws for every model).", "",
               "## Likelihood (held-out bits/dim, lower is better)", "",
               table(["model", "parameters", "training CPU s", "bits/dim", "note"],
                     [[r["model"], r["params"], fmt(r["cpu_s"], 0), fmt(r["bpd"], 4), r["note"]] for r in lik["rows"]],
                     "lrrrl"), "")
    report.add("## Sampling: GS-Jacobi against sequential inversion (same noise, no denoising step)", "",
               "Blocks' CRM share / IGM (latent vs zero start), in `model.blocks` order: " + "; ".join(
                   f"block {k}: {m['crm_share']:.2f} / {m['igm_latent']:.2f} vs {m['igm_zero']:.2f}"
                   for k, m in enumerate(smp["metrics"])) + f". Plan: {smp['plan']}.", "",
               table(["batch", "setting", "wall ms", "speed-up", "transformer calls", "max abs diff"],
                     [[r["batch"], r["setting"], fmt(r["ms"], 1), ratio(r["speedup"]), r["calls"],
                       f"{r['max_diff']:.1e}"] for r in smp["rows"]], "rlrrrr"), "")
    fd = smp["fd"]
    report.add(f"FD (digits classifier, {fd['n']} samples vs held-out): sequential {fmt(fd['sequential'], 3)}, "
               f"GS-Jacobi (tol 1e-3, CRM/IGM plan) {fmt(fd['gs-jacobi (tol 1e-3, plan)'], 3)}, floor "
               f"{fmt(fd['floor (training vs held-out)'], 3)}; max |diff| between the two sample sets "
               f"{fd['max_diff']:.1e}.")
    path = report.write(out, "nf", {"likelihood": lik, "sampling": smp})
    print(report.render())
    log(f"wrote {path}")
    return 0


SUITE = register_suite("nf", "normalizing flows: TarFlow bits/dim vs zuko, GS-Jacobi vs sequential sampling",
                       _arguments, run, doc=__doc__)


def main(argv: Optional[List[str]] = None) -> int:
    """``straightflow bench nf ARGS``."""
    return run_suite("nf", argv)
