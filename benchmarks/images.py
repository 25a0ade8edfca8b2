"""Image-scale flows on CPU: pixel UNet, pixel DiT and latent DiT (autoencoder + flow in its latent space).

For each data set (MNIST from ``shared/data`` when present; procedural RGB shapes at 32x32 always)
three class-conditional (shapes) or unconditional (MNIST, no labels) flows are trained the same way
(AdamW, batch 64, constant lr after warm-up, EMA), in chunks; after every chunk the EMA model is
scored, which gives **training time to a fixed quality**. Then:

- **quality vs NFE**: Euler with NFE 1 -> 100, Fréchet distance in the feature space of a project
  classifier, with the real-vs-real floor (two disjoint real sets of the same size). MNIST uses the
  ``"mnist"`` extractor (trained on scikit-learn digits upsampled to 28x28, a proxy: the shipped
  MNIST split has no labels). Shapes use a classifier trained here on the shapes' *labels*
  (gray-scale 32x32, ``feature_extractor("shapes32gray", x, y)``, since the project classifier
  takes one channel), and the sliced W2 in pixel space (RGB) is reported beside it.
- **sampling throughput**: images per CPU-second at NFE 16 (Euler, batch 256, median of 3;
  the latent flow includes its decoder pass).
- **Bottleneck Sampling** (shapes, 32 -> 16 -> 32) against full-resolution sampling at equal steps:
  time ratio and FD. MNIST's 28 -> 14 does not fit the UNet (needs multiples of 4) or the patch-4
  DiT, so it is skipped there with that reason.

Times are CPU seconds of this process (``time.process_time``, one thread), which a busy shared
machine disturbs far less than wall-clock time. Latent training time includes the autoencoder and
the encoding of the data set. "Time to quality": the first chunk at which a model's FD (Euler,
NFE 8) is within 10 % of the final FD of the pixel UNet, the reference.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from straightflow import data as sfdata, metrics, plotting
from straightflow.flow import Flow
from straightflow.images.bottleneck import bottleneck_sample
from straightflow.images.fast import fast_sample
from straightflow.images.latent import (
    HFlipFlow,
    LatentFlow,
    default_latent_model,
    default_pixel_model,
    encode_dataset,
    train_autoencoder,
)
from straightflow.models import build_model, count_parameters
from straightflow.train import train
from .harness import Report, Timing, fmt, log_to, median_time, register_suite, run_suite

__all__ = ["main", "bench_images"]

FULL = dict(n_train=8000, n_eval=300, flow_steps=600, ae_steps=300, chunks=4, chunk_eval=200,
            nfes=(1, 2, 4, 8, 16, 32, 100), extractor_steps=None, unet_width=16, dit_width=64, depth=4)
QUICK = dict(n_train=256, n_eval=64, flow_steps=12, ae_steps=8, chunks=2, chunk_eval=32,
             nfes=(1, 4), extractor_steps=40, unet_width=8, dit_width=32, depth=1)
BATCH = 64


def _cpu() -> float:
    return time.process_time()


class _Set:
    """One benchmark data set: training data, two disjoint real sets, the quality metric."""

    def __init__(self, name: str, cfg: Dict[str, Any], seed: int, quick: bool) -> None:
        n_train, n_eval = cfg["n_train"], cfg["n_eval"]
        self.name = name
        if name == "mnist":
            ds = sfdata.mnist()
            perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
            x = ds.x[perm]
            if len(x) < n_train + 2 * n_eval:
                n_train = len(x) - 2 * n_eval
            self.train = sfdata.Dataset(x[:n_train], name="mnist")
            self.ref_a, self.ref_b = x[-2 * n_eval:-n_eval], x[-n_eval:]
            self.extractor: Any = "mnist"
            self.gray = False
            self.hflip = False  # mirrored digits are not digits
            self.note = "FD: project 'mnist' extractor (proxy classifier: sklearn digits upsampled to 28x28)"
        elif name == "shapes32":
            ds = sfdata.shapes(n_train + 2 * n_eval, 32, 3, seed=seed)
            self.train = sfdata.Dataset(ds.x[:n_train], ds.y[:n_train], ds.num_classes, "shapes32")
            self.ref_a, self.ref_b = ds.x[n_train:n_train + n_eval], ds.x[n_train + n_eval:]
            lab = sfdata.shapes(3000 if not quick else 300, 32, 3, seed=seed + 777)
            self.extractor = metrics.feature_extractor(
                "shapes32gray" + ("-quick" if quick else ""), x=lab.x.mean(1, keepdim=True), y=lab.y,
                steps=cfg["extractor_steps"])
            self.gray = True
            self.hflip = True  # every shape class is mirror-symmetric
            self.note = ("FD: classifier trained on the shapes' labels (gray 32x32); SW2: sliced W2 on RGB pixels")
        else:
            raise ValueError(f"unknown benchmark data set {name!r}; valid: mnist, shapes32")
        self.shape = tuple(self.train.shape)
        self.num_classes = self.train.num_classes if self.train.y is not None else None

    def labels(self, n: int) -> Optional[Dict[str, torch.Tensor]]:
        return {"y": torch.arange(n) % self.num_classes} if self.num_classes else None

    def fd(self, x: torch.Tensor, ref: Optional[torch.Tensor] = None) -> float:
        ref = self.ref_a if ref is None else ref
        if self.gray:
            x, ref = x.mean(1, keepdim=True), ref.mean(1, keepdim=True)
        return metrics.classifier_fd(x.clamp(-1, 1), ref, extractor=self.extractor)

    def sw2(self, x: torch.Tensor, ref: Optional[torch.Tensor] = None) -> float:
        ref = self.ref_a if ref is None else ref
        return metrics.sliced_w2(x.flatten(1), ref.flatten(1), seed=0)


class _Sampler:
    """Uniform interface over a pixel model and a LatentFlow: Euler at a given NFE."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.latent = isinstance(model, LatentFlow)
        self.net = model.model if self.latent else model
        self.shape = tuple(model.latent_shape if self.latent else model.sample_shape)

    @torch.no_grad()
    def __call__(self, n: int, nfe: int, seed: int, cond) -> torch.Tensor:
        noise = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed))
        r = fast_sample(self.net, noise, "euler", nfe, cond=cond)
        return self.model.decode(r.x) if self.latent else r.x.clamp(-1, 1)


def _train_chunks(flow, data, steps: int, chunks: int, run_dir: Path, score: Callable[[Any], float], t_offset: float,
                  ema: float, seed: int) -> tuple:
    hist: List[Dict[str, float]] = []
    spent = t_offset
    res = None
    for c in range(1, chunks + 1):
        s = max(1, round(steps * c / chunks))
        t0 = _cpu()
        res = train(flow, data, s, out=run_dir, batch_size=BATCH, lr=1e-3, warmup=min(100, steps // 5),
                    ema_decay=ema, seed=seed, ckpt_every=0, progress=False)
        spent += _cpu() - t0
        hist.append({"step": s, "cpu_s": spent, "fd": score(res.model)})
    return res, hist


def _bench_set(name: str, cfg: Dict[str, Any], out: Path, seed: int, quick: bool) -> Dict[str, Any]:
    s = _Set(name, cfg, seed, quick)
    ne, ce = cfg["n_eval"], cfg["chunk_eval"]
    floor = s.fd(s.ref_b)
    floor_sw = s.sw2(s.ref_b)
    K = s.num_classes
    ema = 0.99 if cfg["flow_steps"] < 2000 else 0.999
    FlowCls = HFlipFlow if s.hflip else Flow
    cond_dropout = 0.1 if K else 0.0
    runs = out / "_runs" / name
    models: Dict[str, Any] = {}
    train_info: Dict[str, Any] = {}

    def score(m) -> float:
        return s.fd(_Sampler(m)(ce, 8, seed + 1, s.labels(ce)), s.ref_a[:ce] if ce < ne else s.ref_a)

    log = log_to("images")
    for label, kind, width in (("pixel UNet", "unet", cfg["unet_width"]), ("pixel DiT", "dit", cfg["dit_width"])):
        log(f"{name}: training the {label} ({cfg['flow_steps']} steps)")
        net = build_model(default_pixel_model(s.shape, K, kind, width, cfg["depth"]), seed=seed)
        flow = FlowCls(net, cond_dropout=cond_dropout)
        res, hist = _train_chunks(flow, s.train, cfg["flow_steps"], cfg["chunks"], runs / kind, score, 0.0, ema, seed)
        models[label] = res.model
        train_info[label] = {"params": count_parameters(net), "history": hist, "config": net.config}

    # latent: autoencoder (its CPU time counts), encoding, then the latent DiT in chunks
    log(f"{name}: training the autoencoder ({cfg['ae_steps']} steps) and the latent DiT ({cfg['flow_steps']} steps)")
    t0 = _cpu()
    ae, _ = train_autoencoder(s.train, runs / "autoencoder", cfg["ae_steps"], base_channels=16,
                              batch_size=BATCH, hflip=s.hflip, seed=seed, ckpt_every=0, progress=False)
    lat = encode_dataset(ae, s.train, hflip=s.hflip)
    if not K:
        lat = sfdata.Dataset(lat.x, name=lat.name)
    ae_cpu = _cpu() - t0
    net = build_model(default_latent_model(ae.latent_shape, K, "dit", cfg["dit_width"], cfg["depth"]), seed=seed)
    holder: Dict[str, Any] = {}

    def score_latent(m) -> float:
        holder["lf"] = LatentFlow(m, ae)
        return score(holder["lf"])

    res, hist = _train_chunks(Flow(net, cond_dropout=cond_dropout), lat, cfg["flow_steps"], cfg["chunks"],
                              runs / "latent", score_latent, ae_cpu, ema, seed)
    models["latent DiT"] = LatentFlow(res.model, ae)
    train_info["latent DiT"] = {"params": count_parameters(net) + count_parameters(ae), "history": hist,
                                "config": net.config, "autoencoder": ae.config, "ae_cpu_s": ae_cpu,
                                "ae_recon": getattr(ae, "recon", {}), "latent_shape": list(ae.latent_shape)}

    # quality vs NFE
    log(f"{name}: quality at NFE {', '.join(map(str, cfg['nfes']))}, throughput, Bottleneck Sampling")
    quality: Dict[str, Dict[int, Dict[str, float]]] = {}
    for label, m in models.items():
        smp = _Sampler(m)
        quality[label] = {}
        for nfe in cfg["nfes"]:
            x = smp(ne, nfe, seed + 2, s.labels(ne))
            quality[label][nfe] = {"fd": s.fd(x), "sw2": s.sw2(x)}
    # sample grids (NFE 16 or the largest quick NFE), real data beside them
    grid_nfe = 16 if 16 in cfg["nfes"] or not quick else max(cfg["nfes"])
    panels = [("real", s.ref_b[:40])]
    for label, m in models.items():
        panels.append((f"{label}, NFE {grid_nfe}", _Sampler(m)(40, grid_nfe, seed + 3, s.labels(40))))
    plotting.save_image_panels(panels, out / f"images_{name}_samples.png", nrow=8,
                               suptitle=f"{name}: Euler, NFE {grid_nfe}")
    plotting.save_curves({k: (list(v), [q["fd"] for q in v.values()]) for k, v in quality.items()},
                         out / f"images_{name}_fd_vs_nfe.png", "NFE (Euler)", "classifier FD", floor=floor,
                         title=f"{name}: FD vs NFE")

    # throughput: images per CPU-second at NFE 16, batch 256
    tb = 64 if quick else 256
    thr_nfe = 16
    throughput = {}
    for label, m in models.items():
        smp = _Sampler(m)
        sec = _cpu_median(lambda: smp(tb, thr_nfe, seed, s.labels(tb)), repeats=1 if quick else 3)
        throughput[label] = tb / sec

    # time to quality
    target = train_info["pixel UNet"]["history"][-1]["fd"] * 1.10
    ttq = {}
    for label, info in train_info.items():
        hit = next((h for h in info["history"] if h["fd"] <= target), None)
        ttq[label] = None if hit is None else hit["cpu_s"]

    # Bottleneck Sampling vs full resolution at equal steps
    bottleneck: Dict[str, Any] = {}
    if name == "mnist":
        bottleneck["skipped"] = ("28 -> 14 does not fit the pixel UNet (sizes must be multiples of 4) or the "
                                 "patch-4 DiT (multiples of 4)")
    else:
        steps = (4, 8, 4) if not quick else (1, 2, 1)
        n_st = sum(steps)
        nb = 128 if not quick else 16
        noise = torch.randn((ne, *s.shape), generator=torch.Generator().manual_seed(seed + 4))
        cond = s.labels(ne)
        for label in ("pixel UNet", "pixel DiT"):
            m = models[label]
            full = fast_sample(m, noise, "euler", n_st, cond=cond).x
            row: Dict[str, Any] = {"fd_full": s.fd(full)}
            cond_b = s.labels(nb)
            t_full = _cpu_median(lambda: fast_sample(m, noise[:nb], "euler", n_st, cond=cond_b), 1 if quick else 3)
            for renoise in (0.0, 0.1):
                bs = bottleneck_sample(m, noise, "euler", steps, renoise=renoise, cond=cond, seed=seed)
                t_b = _cpu_median(lambda: bottleneck_sample(m, noise[:nb], "euler", steps, renoise=renoise,
                                                             cond=cond_b, seed=seed), 1 if quick else 3)
                row[f"renoise={renoise}"] = {"fd": s.fd(bs.x), "nfe": bs.nfe, "full_res_nfe": bs.info["full_res_nfe"],
                                             "speedup": t_full / t_b}
            row["steps"] = list(steps)
            bottleneck[label] = row

    return {"name": name, "note": s.note, "shape": list(s.shape), "n_train": len(s.train), "n_eval": ne,
            "floor_fd": floor, "floor_sw2": floor_sw, "quality": quality, "throughput": throughput,
            "throughput_nfe": thr_nfe, "train": train_info, "target_fd": target, "time_to_quality": ttq,
            "bottleneck": bottleneck}


def _cpu_median(fn: Callable[[], Any], repeats: int = 3) -> float:
    return median_time(fn, repeats, clock=_cpu)[0]


def _markdown(res: Dict[str, Any], cmd: str, threads: int = 1) -> Report:
    report = Report("Image-scale flows: pixel UNet, pixel DiT, latent DiT", cmd,
                    Timing(threads, warmup=1, repeats=1 if res["quick"] else 3, clock="CPU seconds of the process"),
                    quick=res["quick"])
    L = [
         "Times are CPU seconds of the process (one thread); throughput is images per CPU-second. "
         "Euler sampler; FD = Fréchet distance of classifier features (lower is better).", ""]
    for d in res["datasets"]:
        L += [f"## {d['name']} ({'x'.join(map(str, d['shape']))}, {d['n_train']} training images, "
              f"{d['n_eval']} samples per score)", "", d["note"] + ".", ""]
        nfes = list(next(iter(d["quality"].values())).keys())
        L.append("| model | params | " + " | ".join(f"FD @ NFE {n}" for n in nfes) + " |")
        L.append("|---|---:|" + "---:|" * len(nfes))
        for label, q in d["quality"].items():
            L.append(f"| {label} | {d['train'][label]['params']:,} | "
                     + " | ".join(fmt(q[n]["fd"]) for n in nfes) + " |")
        L.append("| real data (floor) | | " + " | ".join(fmt(d["floor_fd"]) for _ in nfes) + " |")
        L += ["", "| model | SW2 @ NFE " + str(nfes[-1]) + f" (floor {fmt(d['floor_sw2'], 3)}) | train CPU s | "
              f"time to FD <= {fmt(d['target_fd'])} (CPU s) | final chunk FD | images/s @ NFE {d['throughput_nfe']} |",
              "|---|---:|---:|---:|---:|---:|"]
        for label, q in d["quality"].items():
            h = d["train"][label]["history"]
            L.append(f"| {label} | {fmt(q[nfes[-1]]['sw2'], 3)} | {fmt(h[-1]['cpu_s'], 1)} | "
                     f"{fmt(d['time_to_quality'][label], 1) if d['time_to_quality'][label] is not None else 'not reached'}"
                     f" | {fmt(h[-1]['fd'])} | {fmt(d['throughput'][label], 1)} |")
        lat = d["train"]["latent DiT"]
        L += ["", f"Latent: autoencoder {'x'.join(map(str, d['shape']))} -> {'x'.join(map(str, lat['latent_shape']))} "
              f"(reconstruction PSNR {fmt(lat['ae_recon'].get('psnr'))} dB), {fmt(lat['ae_cpu_s'], 1)} CPU s of the "
              "latent training time are the autoencoder and the encoding.", ""]
        L.append("Training curves (FD at NFE 8 after each chunk; CPU s):")
        L.append("")
        for label, info in d["train"].items():
            L.append(f"- {label}: " + ", ".join(f"{h['step']} steps / {h['cpu_s']:.0f} s: {h['fd']:.2f}"
                                                 for h in info["history"]))
        b = d["bottleneck"]
        L.append("")
        if "skipped" in b:
            L += [f"Bottleneck Sampling: skipped ({b['skipped']}).", ""]
        else:
            L += ["Bottleneck Sampling (32 -> 16 -> 32) vs full resolution, Euler, equal steps "
                  f"{sum(next(iter(b.values()))['steps'])} (stages {next(iter(b.values()))['steps']}); speed-up = "
                  "CPU time ratio (median of 3):", "",
                  "| model | FD full res | renoise | FD bottleneck | NFE (full-res equivalent) | speed-up |",
                  "|---|---:|---:|---:|---:|---:|"]
            for label, row in b.items():
                for key in ("renoise=0.0", "renoise=0.1"):
                    r = row[key]
                    L.append(f"| {label} | {fmt(row['fd_full'])} | {key.split('=')[1]} | {fmt(r['fd'])} | "
                             f"{r['nfe']} ({fmt(r['full_res_nfe'], 1)}) | {fmt(r['speedup'])}x |")
            L.append("")
        L += [f"![samples](images_{d['name']}_samples.png) ![fd](images_{d['name']}_fd_vs_nfe.png)", ""]
    return report.add(*L)


def bench_images(out: str, quick: bool = False, datasets: Optional[Sequence[str]] = None, seed: int = 0,
                 threads: int = 1, cmd: str = "straightflow bench images", **overrides: Any) -> Dict[str, Any]:
    torch.set_num_threads(int(threads))
    cfg = dict(QUICK if quick else FULL)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if datasets is None:
        datasets = ["shapes32"] if quick else (["mnist"] if sfdata.mnist_path() else []) + ["shapes32"]
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    t0 = _cpu()
    w0 = time.perf_counter()
    res = {"command": cmd, "date": _dt.date.today().isoformat(), "quick": quick, "config": cfg, "datasets": []}
    for name in datasets:
        res["datasets"].append(_bench_set(name, cfg, outp, seed, quick))
    res["cpu_seconds"], res["wall_seconds"] = _cpu() - t0, time.perf_counter() - w0
    report = _markdown(res, cmd, threads).add(f"Total: {res['cpu_seconds']:.0f} CPU s, {res['wall_seconds']:.0f} s wall.")
    md = report.render()
    res["date"] = report.date
    report.write(outp, "images", res)
    shutil.rmtree(outp / "_runs", ignore_errors=True)
    res["markdown"] = md
    return res


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", default=None, help="comma-separated: mnist, shapes32 (default: both if MNIST is present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flow-steps", type=int, default=None)
    p.add_argument("--ae-steps", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=None)


def run(a: argparse.Namespace) -> int:
    ds = [d for d in a.datasets.split(",") if d] if a.datasets else None
    res = bench_images(a.out, quick=a.quick, datasets=ds, seed=a.seed, threads=a.threads, cmd=a.command,
                       flow_steps=a.flow_steps, ae_steps=a.ae_steps, n_eval=a.n_eval)
    print(res["markdown"])
    return 0


SUITE = register_suite("images", "pixel UNet, pixel DiT and latent DiT: quality vs NFE, CPU time to quality, "
                       "throughput, Bottleneck Sampling", _arguments, run, doc=__doc__.split("\n\n")[0])


def main(argv: Optional[List[str]] = None) -> int:
    """``straightflow bench images ARGS``."""
    return run_suite("images", argv)
