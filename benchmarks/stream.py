"""``straightflow bench stream``: Stream Batch vs sequential denoising, RCFG vs full CFG, the
similarity filter on a clip with static stretches, motion-aware strength, a websocket load test (with
a client flooding hostile messages alongside), and the served page's fps in headless Chromium.

Everything runs in one process on the same model and clip (the load test starts
``straightflow serve`` in a subprocess on loopback). Throughput is measured saturated: frames are
pushed back to back into the pipeline (after a warm-up pass); a frame's latency is the time from
its push to the return of the call that finishes it (Stream Batch: n - 1 later pushes). Each
configuration is timed ``--repeats`` times in rotation and the median is reported, with ratios
taken inside the same run. Thread counts: ``--thread-list`` (default 1,2).

The ``cost`` section shows when residual CFG pays: it times single model calls of 1..8 rows (the
per-call cost-vs-rows line) and RCFG self / one-time vs full CFG at n = 1, 2, 4, on one thread, for the
``small`` run model (the ``--run`` model: by default the streaming default, a 32x32 shapes UNet with 16
base channels; the 8x8 digits UNet of earlier reports was per-call overhead dominated) and a ``large`` 32x32 RGB UNet
(randomly initialised: throughput does not depend on the weights) whose cost grows with its rows.
Full CFG computes ``2n`` rows per call, self ``n``, one-time ``n + 1``, so the RCFG speed-up is
``cost(2n) / cost(n)`` resp. ``cost(2n) / cost(n + 1)`` of the cost line. ``--sections`` picks sections.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from straightflow import checkpoint
from straightflow.models import UNet
from straightflow.stream import resolve_run
from straightflow.stream.clips import builtin_clip, static_mask
from straightflow.stream.filter import SimilarityFilter, cosine_similarity
from straightflow.stream.pipeline import MotionStrength, StreamBatchPipeline, rows_per_call
from straightflow.stream.server import encode_png
from .harness import Report, Timing, register_suite, run_suite

__all__ = ["main", "SECTIONS", "LARGE_SPEC"]

SECTIONS = ("batch", "rcfg", "filter", "motion", "load", "cost", "page")
# compute-bound model for the cost section: 32x32 RGB (the shapes data), 5 classes (shapes), ~5.6M parameters
LARGE_SPEC: Dict[str, Any] = {"in_channels": 3, "resolution": 32, "base_channels": 96, "channel_mults": (1, 2, 2),
                              "num_classes": 5}
LARGE_SPEC_QUICK: Dict[str, Any] = {**LARGE_SPEC, "base_channels": 32}
COST_ROWS = (1, 2, 3, 4, 5, 8)  # covers n, n + 1 and 2n for n = 1, 2, 4


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thread-list", default="1,2", help="torch thread counts for the throughput tables "
                   "(--threads: those of the load-test server)")
    p.add_argument("--run", default="default",
                   help="run directory, or 'default' (the cached default streaming model: 32x32 shapes UNet)")
    p.add_argument("--frames", type=int, default=None, help="clip length (default 160, quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 1)")
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--label", type=int, default=3)
    p.add_argument("--filter", type=float, default=0.99, help="similarity threshold for the filter comparison")
    p.add_argument("--load-frames", type=int, default=None, help="frames per load-test client (default 1000, quick 60)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--hostile", type=int, default=None,
                   help="hostile messages (deep JSON, NaN shapes, bad labels, junk) flooded by one more load-test "
                   "client at the same time (default 2000, quick 60; 0: none)")
    p.add_argument("--no-load-test", action="store_true")
    p.add_argument("--sections", default="all",
                   help=f"comma-separated sections to run: all or any of {', '.join(SECTIONS)}")
    p.add_argument("--rcfg-model", default="both", choices=("small", "large", "both"),
                   help="models of the cost section: small (the --run model), large (32x32 RGB UNet), both")
    p.add_argument("--large-frames", type=int, default=None, help="clip length for the large model (default 32, quick 4)")
    p.add_argument("--page-send-fps", default="15,60",
                   help="page section: the page's send rates to measure (its default is 15, its maximum 60; quick: the last)")
    p.add_argument("--page-seconds", type=float, default=None, help="page section: seconds per send rate (default 20, quick 2)")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="page section: the Chromium executable")


def _sections(spec: str) -> set:
    names = [v.strip() for v in spec.split(",") if v.strip()]
    if names == ["all"]:
        names = list(SECTIONS)
    bad = [v for v in names if v not in SECTIONS]
    if bad or not names:
        raise ValueError(f"unknown --sections {', '.join(bad) or repr(spec)}; valid: all, {', '.join(SECTIONS)}")
    return set(names)


# ----------------------------------------------------------------------------- throughput
def _time_pipeline(pipe, clip: torch.Tensor, filt=None) -> Dict[str, Any]:
    """Push the clip back to back; returns fps, latencies (s), calls/rows per output, skipped."""

    pipe.reset(seed=0)
    if filt is not None:
        filt.reset()
    calls0, rows0 = pipe.calls, pipe.rows
    arrivals: Dict[int, float] = {}
    lat: List[float] = []
    outputs = 0
    skipped = 0
    last = None
    steady_wall: List[float] = []  # pushes that return a frame: one full-batch call each (no warm-up, no flush)
    steady_cpu: List[float] = []   # the same pushes in CPU time of this thread (excludes time descheduled)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, f in enumerate(clip):
            now = time.perf_counter()
            if filt is not None and last is not None and not filt(f):
                skipped += 1
                outputs += 1
                lat.append(time.perf_counter() - now)
                continue
            if filt is not None and last is None:
                filt(f)
            arrivals[i] = now
            tc, tp = time.thread_time(), time.perf_counter()
            r = pipe.push(f, meta=i)
            if r is not None:
                done = time.perf_counter()
                steady_wall.append(done - tp)
                steady_cpu.append(time.thread_time() - tc)
                last = r.x
                outputs += 1
                lat.append(done - arrivals.pop(r.meta))
        for r in pipe.flush():
            outputs += 1
            lat.append(time.perf_counter() - arrivals.pop(r.meta))
    dt = time.perf_counter() - t0
    gen = max(outputs - skipped, 1)
    return {"seconds": dt, "fps": outputs / dt, "steady_wall": steady_wall, "steady_cpu": steady_cpu, "lat": lat, "outputs": outputs, "skipped": skipped,
            "calls_per_frame": (pipe.calls - calls0) / gen, "rows_per_frame": (pipe.rows - rows0) / gen,
            "calls_per_output": (pipe.calls - calls0) / max(outputs, 1)}


def _inv_median(seconds: List[float]) -> Optional[float]:
    """``1 / median`` of per-frame times (frames per second), None when empty or zero."""
    m = float(np.median(seconds)) if seconds else 0.0
    return 1.0 / m if m > 0 else None


def _bench_configs(model, clip, configs, repeats: int, threads: int) -> List[Dict[str, Any]]:

    torch.set_num_threads(threads)
    pipes = []
    for c in configs:
        pipe = StreamBatchPipeline(model, c["n"], c["strength"], rcfg=c["rcfg"], guidance=c["guidance"],
                                   label=c["label"], batched=c["mode"] == "stream", seed=0)
        filt = SimilarityFilter(c["filter"], c.get("max_skip", 10), seed=0) if c.get("filter") is not None else None
        pipes.append((c, pipe, filt))
    for c, pipe, filt in pipes:  # warm-up
        _time_pipeline(pipe, clip[: max(4, 2 * c["n"])], filt)
    runs: List[List[Dict[str, Any]]] = [[] for _ in pipes]
    for r in range(repeats):
        order = list(range(len(pipes)))
        order = order[r % len(order):] + order[: r % len(order)]  # rotate to spread drift
        for k in order:
            c, pipe, filt = pipes[k]
            runs[k].append(_time_pipeline(pipe, clip, filt))
    rows = []
    for (c, pipe, filt), rs in zip(pipes, runs):
        med = sorted(rs, key=lambda d: d["fps"])[len(rs) // 2]
        lat = np.array([v for d in rs for v in d["lat"]])
        rows.append({**{k: c[k] for k in ("mode", "n", "rcfg", "strength", "guidance")}, "filter": c.get("filter"),
                     "threads": threads, "fps": med["fps"], "fps_all": [d["fps"] for d in rs],
                     "fps_steady": _inv_median([v for d in rs for v in d["steady_wall"]]),
                     "fps_steady_cpu": _inv_median([v for d in rs for v in d["steady_cpu"]]),
                     "latency_ms_p50": 1e3 * float(np.percentile(lat, 50)),
                     "latency_ms_p99": 1e3 * float(np.percentile(lat, 99)),
                     "calls_per_frame": med["calls_per_frame"], "rows_per_frame": med["rows_per_frame"],
                     "calls_per_output": med["calls_per_output"], "skipped": med["skipped"], "outputs": med["outputs"],
                     "frames": len(clip)})
    return rows


# ----------------------------------------------------------------------------- cost section
def _large_model(spec: Dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A randomly initialised UNet (``conv_out`` re-initialised so that velocities are not all zero)."""

    torch.manual_seed(seed)
    m = UNet(**spec)
    m.conv_out.reset_parameters()
    for q in m.parameters():
        q.requires_grad_(False)
    return m.eval()


def _cost_line(model, rows_list, reps: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Median wall and thread-CPU time of one model call on ``r`` rows for each ``r`` (sizes rotated between repeats)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(model.sample_shape)
    k = getattr(model, "num_classes", None)
    inputs = {}
    for r in rows_list:
        x = torch.randn((r, *shape), generator=g)
        t = torch.rand(r, generator=g)
        inputs[r] = (x, t, {"y": torch.randint(0, int(k) + 1, (r,), generator=g)} if k else {})
    wall: Dict[int, List[float]] = {r: [] for r in rows_list}
    cpu: Dict[int, List[float]] = {r: [] for r in rows_list}
    with torch.no_grad():
        for r in rows_list:  # warm-up
            for _ in range(2):
                x, t, c = inputs[r]
                model(x, t, **c)
        order = list(rows_list)
        for i in range(reps):
            for r in order[i % len(order):] + order[: i % len(order)]:
                x, t, c = inputs[r]
                tc, t0 = time.thread_time(), time.perf_counter()
                model(x, t, **c)
                wall[r].append(time.perf_counter() - t0)
                cpu[r].append(time.thread_time() - tc)
    out = []
    for r in rows_list:
        out.append({"rows": r, "ms": 1e3 * float(np.median(wall[r])), "ms_cpu": 1e3 * float(np.median(cpu[r])),
                    "ms_all": [1e3 * v for v in wall[r]], "ms_cpu_all": [1e3 * v for v in cpu[r]]})
    for d in out:
        d["relative_to_1row"] = d["ms"] / out[0]["ms"]
        d["relative_to_1row_cpu"] = d["ms_cpu"] / out[0]["ms_cpu"]
    return out


def _predicted_ratio(line: List[Dict[str, Any]], rcfg: str, n: int, key: str = "ms_cpu") -> Optional[float]:
    """``cost(2n) / cost(rows of rcfg)`` from the measured cost line (None when a size was not timed)."""

    ms = {d["rows"]: d[key] for d in line}
    a, b = ms.get(rows_per_call("full", n)), ms.get(rows_per_call(rcfg, n))
    return a / b if a and b else None


def _cost_section(name: str, model, clip: torch.Tensor, label: Optional[int], ns, rows_list, repeats: int,
                  cost_reps: int, strength: float, guidance: float) -> Dict[str, Any]:
    torch.set_num_threads(1)
    params = sum(p.numel() for p in model.parameters())
    c, h, w = model.sample_shape
    print(f"[bench stream] cost: {name} model ({params} parameters, {c}x{h}x{w}): cost vs rows", flush=True)
    line = _cost_line(model, rows_list, cost_reps)
    res: Dict[str, Any] = {"model": name, "parameters": params, "shape": [c, h, w], "frames": len(clip),
                           "cost_reps": cost_reps, "cost_line": line, "rcfg": []}
    if label is None:
        res["note"] = "unconditional model: no RCFG"
        return res
    print(f"[bench stream] cost: {name} model: full CFG vs RCFG self / one-time at n = {list(ns)}", flush=True)
    cfgs = [{"mode": "stream", "n": n, "rcfg": r, "strength": strength, "guidance": guidance, "label": label,
             "filter": None} for n in ns for r in ("full", "self", "initialize")]
    rows = _bench_configs(model, clip, cfgs, repeats, 1)

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a and b else None

    for r in rows:
        full = next(b for b in rows if b["n"] == r["n"] and b["rcfg"] == "full")
        r["x_full"] = r["fps"] / full["fps"]
        r["x_full_steady"] = ratio(r["fps_steady"], full["fps_steady"])
        r["x_full_steady_cpu"] = ratio(r["fps_steady_cpu"], full["fps_steady_cpu"])
        r["predicted_x_full"] = _predicted_ratio(line, r["rcfg"], r["n"], "ms_cpu")
        r["predicted_x_full_wall"] = _predicted_ratio(line, r["rcfg"], r["n"], "ms")
        r["model"] = name
    res["rcfg"] = rows
    return res


def _cost_md(results: List[Dict[str, Any]], rows_list, repeats: int, guidance: float) -> List[str]:

    lo, hi = rows_list[-3], rows_list[-1]
    md = ["## RCFG where a call's cost grows with its rows (cost section, 1 thread)", "",
          "Full CFG runs `2n` rows per call, RCFG self `n`, one-time `n + 1` (the null row of the newest frame at "
          "its first stage), so at equal steps RCFG's speed-up over full CFG is the cost ratio of those calls: "
          "`cost(2n) / cost(n)` for self and `cost(2n) / cost(n + 1)` for one-time. Where a call's cost is "
          "proportional to its rows these are 2 and 2n / (n + 1) (1.0, 1.33, 1.6 at n = 1, 2, 4: one-time cannot "
          "reach 1.8x below n = 9 on any hardware); where a fixed per-call cost dominates (small tensors: ~20 "
          "convolutions on 8x8 maps cost mostly framework overhead) both stay near 1. The line below times one model "
          "call of r rows (median of " + ", ".join(f"{R['cost_reps']} ({R['model']})" for R in results)
          + " calls per size, sizes rotated), in wall time and in CPU time of "
          "the one compute thread (`time.thread_time`: it leaves out the time the process waits for a core, which "
          "on a shared machine is what makes wall-clock medians noisy).", "",
          "| model | parameters | shape | clock | " + " | ".join(f"{r} row{'s' if r > 1 else ''} (ms)" for r in rows_list)
          + f" | cost({hi}) / cost(1) | ms per extra row ({lo} → {hi}) |",
          "|" + "---|" * (len(rows_list) + 6)]
    for R in results:
        for key, clock in (("ms_cpu", "CPU"), ("ms", "wall")):
            ms = {d["rows"]: d[key] for d in R["cost_line"]}
            md.append(f"| {R['model']} | {R['parameters']:,} | {'x'.join(map(str, R['shape']))} | {clock} | "
                      + " | ".join(f"{ms[r]:.2f}" for r in rows_list)
                      + f" | {ms[hi] / ms[rows_list[0]]:.2f} | {(ms[hi] - ms[lo]) / (hi - lo):.2f} |")
    md += ["", f"Throughput (Stream Batch, guidance {guidance}, saturated, {repeats} timed repeat(s) in rotation). "
           "Whole-run fps (median run) counts the n - 1 warm-up and flush calls of fewer rows; steady-state fps is "
           "1 / the median time of a push that returns a frame (one call on the full batch), pooled over the "
           "repeats, in wall and in thread-CPU time; “predicted” is the CPU cost-line ratio above.", "",
           "| model | n | rcfg | rows / call (steady) | rows / frame | fps (whole run) | × full | fps steady (wall) | "
           "× full | fps steady (CPU) | × full | predicted × full | latency p50 (ms) |", "|" + "---|" * 13]
    for R in results:
        for r in R["rcfg"]:
            md.append(f"| {R['model']} | {r['n']} | {r['rcfg']} | {rows_per_call(r['rcfg'], r['n'])} | "
                      f"{r['rows_per_frame']:.2f} | {r['fps']:.1f} | {r['x_full']:.2f} | {_fmt(r['fps_steady'])} | "
                      f"{_fmt(r['x_full_steady'], 2)} | {_fmt(r['fps_steady_cpu'])} | {_fmt(r['x_full_steady_cpu'], 2)} | "
                      f"{_fmt(r['predicted_x_full'], 2)} | {r['latency_ms_p50']:.1f} |")
    md.append("")
    for R in results:
        if not R["rcfg"]:
            md += [f"{R['model']}: {R.get('note', '')}", ""]
            continue
        ms = {d["rows"]: d["ms_cpu"] for d in R["cost_line"]}

        def fmt(mode: str, key: str) -> str:
            return ", ".join(f"{_fmt(r[key], 2)}x (n={r['n']})" for r in R["rcfg"] if r["rcfg"] == mode)

        hit = [r["n"] for r in R["rcfg"] if r["rcfg"] == "self" and (r["x_full_steady_cpu"] or 0) >= 1.8]
        hit_wall = [r["n"] for r in R["rcfg"] if r["rcfg"] == "self" and (r["x_full_steady"] or 0) >= 1.8]
        md.append(f"- **{R['model']}**: a {hi}-row call costs {ms[hi] / ms[rows_list[0]]:.2f}x a 1-row call (CPU "
                  f"time); steady-state RCFG self / full CFG = {fmt('self', 'x_full_steady_cpu')} in CPU time, "
                  f"{fmt('self', 'x_full_steady')} in wall time; one-time / full CFG = "
                  f"{fmt('initialize', 'x_full_steady_cpu')} (CPU), {fmt('initialize', 'x_full_steady')} (wall). "
                  f"Self >= 1.8x: CPU time {'n = ' + ', '.join(map(str, hit)) if hit else 'none'}, wall time "
                  f"{'n = ' + ', '.join(map(str, hit_wall)) if hit_wall else 'none'}.")
    md.append("")
    return md


def _plot_cost(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    rmax = 1
    for R in results:
        rs = [d["rows"] for d in R["cost_line"]]
        rmax = max(rmax, max(rs))
        ax.plot(rs, [d["relative_to_1row_cpu"] for d in R["cost_line"]], "o-", label=f"{R['model']} ({R['parameters']:,} params)")
    ax.plot([1, rmax], [1, rmax], "k--", lw=0.8, label="cost proportional to rows")
    ax.set_xlabel("rows in one call")
    ax.set_ylabel("call CPU time / 1-row call CPU time")
    ax.set_title("per-call cost vs rows (1 thread)")
    ax.legend(fontsize=8)
    ax = axes[1]
    bars = [(R["model"], r) for R in results for r in R["rcfg"] if r["rcfg"] != "full"]
    xs = range(len(bars))
    ax.bar(xs, [r["x_full_steady_cpu"] or 0 for _, r in bars],
           color=["#2a7" if r["rcfg"] == "self" else "#37c" for _, r in bars])
    ax.plot(xs, [r["x_full_steady"] or 0 for _, r in bars], "k_", ms=18, mew=2, label="wall time")
    ax.axhline(1.8, color="#c33", lw=1, ls="--", label="1.8x target")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{m}\nn={r['n']}\n{'self' if r['rcfg'] == 'self' else 'one-time'}" for m, r in bars], fontsize=7)
    ax.set_ylabel("steady-state fps / full-CFG fps (same n)")
    ax.set_title("RCFG vs full CFG, CPU time (green: self, blue: one-time)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- load test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _http_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read().decode())


async def _client(url: str, frames: List[str], res: Dict[str, Any], idle_s: float) -> None:
    import websockets

    sent_at: Dict[int, float] = {}
    lat: List[float] = []
    got = {"frame": 0, "error": 0, "rate_limited": 0}
    async with websockets.connect(url, max_size=2 ** 22) as ws:
        await ws.recv()  # hello
        done_sending = asyncio.Event()

        async def reader() -> None:
            while True:
                try:
                    msg = await asyncio.wait_for(ws.recv(), timeout=idle_s if done_sending.is_set() else 30)
                except asyncio.TimeoutError:
                    if done_sending.is_set():
                        return
                    continue
                m = json.loads(msg)
                if m["type"] == "frame":
                    got["frame"] += 1
                    t = sent_at.get(m["id"])
                    if t is not None and not m.get("skipped"):
                        lat.append(time.perf_counter() - t)
                elif m["type"] == "error":
                    got["error"] += 1
                    got["rate_limited"] += bool(m.get("rate_limited"))

        rd = asyncio.create_task(reader())
        for i, img in enumerate(frames):
            sent_at[i] = time.perf_counter()
            await ws.send(json.dumps({"type": "frame", "id": i, "image": img}))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the reader run: a flood, not a stall
        done_sending.set()
        await rd
    res.update(sent=len(frames), received=got["frame"], errors=got["error"], rate_limit_notices=got["rate_limited"],
               latencies=lat)


def hostile_messages() -> List[Any]:
    """The messages the first-hour audit attacked the server with (issue 15, item 6): not JSON,
    JSON nested 20,000 deep, Infinity / NaN / booleans in a frame's shape, a boolean or
    fractional label, a NaN strength, unechoable ids, binary junk. Each must be answered with an
    error message on an open connection."""
    deep = "[" * 20000 + "]" * 20000
    flat = json.dumps([0.0] * 64)
    return [
        "not json {",
        deep,
        '{"type": "frame", "id": 1, "data": ' + deep + ', "shape": [1, 8, 8]}',
        '{"type": "frame", "data": [0.0], "shape": [Infinity, 8, 8]}',
        '{"type": "frame", "data": [0.0], "shape": [NaN, 8, 8]}',
        '{"type": "frame", "data": [0.0], "shape": [true, 8, 8]}',
        json.dumps({"type": "config", "label": True}),
        json.dumps({"type": "config", "label": 2.5}),
        '{"type": "config", "strength": NaN}',
        '{"type": "frame", "id": [[1]], "data": ' + flat + ', "shape": [1, 8, 8]}',
        '{"type": "frame", "ts": Infinity, "data": ' + flat + ', "shape": [1, 8, 8]}',
        json.dumps({"type": "dance"}),
        b"\xff\xfe\x00" * 8,  # binary junk
    ]


async def _hostile_client(url: str, n_messages: int, res: Dict[str, Any], idle_s: float) -> None:
    """Floods ``n_messages`` hostile messages (:func:`hostile_messages`, cycled), reads the replies,
    then checks the connection still answers a ping."""
    import websockets

    msgs = hostile_messages()
    got = {"error": 0, "rate_limited": 0, "other": 0}
    pong = asyncio.Event()
    closed: Dict[str, Any] = {}
    async with websockets.connect(url, max_size=2 ** 22) as ws:
        await ws.recv()  # hello

        async def reader() -> None:
            while True:
                try:
                    msg = await asyncio.wait_for(ws.recv(), timeout=idle_s if pong.is_set() else 60)
                except asyncio.TimeoutError:
                    return
                except websockets.ConnectionClosed as e:
                    closed.update(code=getattr(e, "code", None))
                    return
                m = json.loads(msg)
                if m["type"] == "pong":
                    pong.set()
                elif m["type"] == "error":
                    got["error"] += 1
                    got["rate_limited"] += bool(m.get("rate_limited"))
                else:
                    got["other"] += 1

        rd = asyncio.create_task(reader())
        try:
            for i in range(n_messages):
                await ws.send(msgs[i % len(msgs)])
                if i % 50 == 49:
                    await asyncio.sleep(0)
            await asyncio.sleep(1.5)  # let the rate limiter refill: the ping must not be rate-limited
            await ws.send(json.dumps({"type": "ping", "ts": 1}))
        except websockets.ConnectionClosed as e:
            closed.update(code=getattr(e, "code", None))
        await rd
    res.update(sent=n_messages, error_replies=got["error"], rate_limit_notices=got["rate_limited"],
               open_after=pong.is_set() and not closed, close_code=closed.get("code"))


def _load_test(run: str, n_clients: int, n_frames: int, threads: int, rate: Optional[float], quick: bool,
               shape=(1, 8, 8), n_hostile: int = 0) -> Dict[str, Any]:
    """``n_clients`` flood PNG frames of the model's ``shape`` (C, H, W) at ``straightflow serve``;
    with ``n_hostile`` > 0 one more client floods that many hostile messages at the same time."""

    port = _free_port()
    cmd = [sys.executable, "-m", "straightflow.cli", "--threads", str(threads), "serve", run, "--port", str(port),
           "--n-steps", "2", "--rcfg", "self", "--log-level", "error"]
    if rate is not None:
        cmd += ["--rate", str(rate), "--burst", "100"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    import tempfile

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    out: Dict[str, Any] = {"command": " ".join(["straightflow"] + cmd[3:]), "clients": n_clients, "frames_per_client": n_frames}
    try:
        t0 = time.time()
        while True:
            try:
                _http_json(base + "/health")
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 120:
                    log.seek(0)
                    raise RuntimeError(f"server did not start: {log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.2)
        rss = [_rss_mb(proc.pid)]
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                rss.append(_rss_mb(proc.pid))
                time.sleep(0.1)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        c, h, _ = shape
        clip = builtin_clip(64, h, c)
        pngs = [encode_png(f) for f in clip]
        results: List[Dict[str, Any]] = [{} for _ in range(n_clients)]
        hostile: Dict[str, Any] = {}

        async def all_clients() -> None:
            ws = f"ws://127.0.0.1:{port}/ws"
            jobs = [_client(ws, [pngs[(i + k * 7) % len(pngs)] for i in range(n_frames)], results[k], idle_s=2.0)
                    for k in range(n_clients)]
            if n_hostile:
                jobs.append(_hostile_client(ws, n_hostile, hostile, idle_s=2.0))
            await asyncio.gather(*jobs)

        t1 = time.perf_counter()
        asyncio.run(all_clients())
        wall = time.perf_counter() - t1
        stop.set()
        th.join()
        stats = _http_json(base + "/stats")
        alive = _http_json(base + "/health").get("status") == "ok" and proc.poll() is None
        lat = np.array([v for r in results for v in r["latencies"]]) if results else np.array([])
        out.update(
            seconds=wall, server_alive_after=bool(alive), rss_mb_start=rss[0], rss_mb_max=float(np.nanmax(rss)),
            rss_mb_end=rss[-1], sent=sum(r["sent"] for r in results), received=sum(r["received"] for r in results),
            rate_limit_notices=sum(r["rate_limit_notices"] for r in results),
            delivered_latency_ms_p50=1e3 * float(np.percentile(lat, 50)) if lat.size else None,
            delivered_latency_ms_p99=1e3 * float(np.percentile(lat, 99)) if lat.size else None,
            server={k: stats[k] for k in ("frames_in", "frames_out", "dropped_stale", "dropped_out", "rate_limited",
                                          "rejected", "processed", "withheld_warmup", "generator_errors",
                                          "latency_ms_p50", "latency_ms_p99", "clients_total")},
            rate=rate if rate is not None else stats["config"]["rate"], frame_shape=list(shape), hostile=hostile,
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        text = log.read().decode(errors="replace")
        out["server_tracebacks"] = text.count("Traceback")
        log.close()
    return out


# ----------------------------------------------------------------------------- report
def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _table(rows: List[Dict[str, Any]], base_key, base_label: str) -> str:
    head = ("| threads | mode | n | rcfg | filter | fps | × " + base_label + " | latency p50 (ms) | latency p99 (ms) | "
            "calls / generated frame | rows / generated frame | skipped |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        b = base_key(r)
        ratio = r["fps"] / b["fps"] if b else None
        lines.append(f"| {r['threads']} | {r['mode']} | {r['n']} | {r['rcfg']} | {_fmt(r['filter'], 2)} | {r['fps']:.1f} | "
                     f"{_fmt(ratio, 2)} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | "
                     f"{r['calls_per_frame']:.2f} | {r['rows_per_frame']:.2f} | {r['skipped']} |")
    return "\n".join(lines)


def _plot(rows: List[Dict[str, Any]], motion: Dict[str, Any], path: Path) -> None:
    """Left: Stream Batch throughput bars (when measured); right: motion-aware strength (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(rows)) + int(bool(motion))
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if rows:
        ax = axes.pop(0)
        r1 = [r for r in rows if r["threads"] == rows[0]["threads"] and r.get("filter") is None]
        labels = [f"{r['mode'][:3]} n={r['n']}\n{r['rcfg']}" for r in r1]
        ax.bar(range(len(r1)), [r["fps"] for r in r1], color=["#888" if r["mode"] == "sequential" else "#2a7" for r in r1])
        ax.set_xticks(range(len(r1)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("frames / s")
        ax.set_title(f"throughput ({rows[0]['threads']} thread(s)); grey = sequential")
    if motion:
        ax = axes.pop(0)
        ax.plot(motion["diff"], label="mean |frame difference|", color="#888")
        ax.plot(motion["strength"], label="motion-aware strength", color="#c33")
        ax.fill_between(range(len(motion["static"])), 0, 1, where=motion["static"], alpha=0.1, color="b", label="static stretch")
        ax.set_xlabel("frame")
        ax.legend(fontsize=8)
        ax.set_title("StreamDiffusionV2 motion-aware strength on the built-in clip")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- page section
def _page_fps(model, send_rates: List[int], seconds: float, chromium: str, settle: float = 2.0) -> Dict[str, Any]:
    """The served page in headless Chromium (Playwright), streaming its built-in clip through
    ``model`` with the server's defaults: per send rate, the output fps the page receives, the
    round-trip latency it shows and the mean input/output luminance correlation it measures (and
    the same against the input 8 frames earlier). ``{"skipped": reason}`` without Chromium or Playwright."""
    import shutil

    if not (os.path.exists(chromium) or shutil.which(chromium)):
        return {"skipped": f"{chromium} is not installed (apt-get install chromium)"}
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"skipped": "playwright is not installed (make browser)"}
    import uvicorn

    from straightflow.stream.server import ServerConfig, create_app

    cfg = ServerConfig()
    app = create_app(model, cfg)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        if time.time() - t0 > 60 or not th.is_alive():
            raise RuntimeError("the page server did not start")
        time.sleep(0.05)

    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and bool(np.isfinite(v))

    rows: List[Dict[str, Any]] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            version = browser.version
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("window.sfTrack.length > 5", timeout=120_000)
            for rate in send_rates:
                page.fill("#fps", str(rate))
                page.wait_for_timeout(int(1000 * settle))  # settle at the new rate
                before = _http_json(f"http://127.0.0.1:{port}/stats")
                n0, t1 = page.evaluate("window.sfReceived"), time.perf_counter()
                page.wait_for_timeout(int(1000 * seconds))
                fps = (page.evaluate("window.sfReceived") - n0) / (time.perf_counter() - t1)
                after = _http_json(f"http://127.0.0.1:{port}/stats")
                track = [r for r in page.evaluate("window.sfTrack")[-max(30, int(fps * seconds)):]
                         if not r["skipped"] and finite(r["corr"])]
                stale = [r["stale"] for r in track if finite(r["stale"])]
                rows.append({"send_fps": rate, "output_fps": fps, "round_trip_ms": page.locator("#lat").inner_text(),
                             "corr": float(np.mean([r["corr"] for r in track])) if track else None,
                             "corr_stale": float(np.mean(stale)) if stale else None,
                             "frames_in": after["frames_in"] - before["frames_in"],
                             "dropped_stale": after["dropped_stale"] - before["dropped_stale"],
                             "server_latency_ms_p50": after["latency_ms_p50"],
                             "server_latency_ms_p99": after["latency_ms_p99"]})
            browser.close()
    finally:
        server.should_exit = True
        th.join(10)
    return {"chromium": version, "seconds": seconds, "n_steps": cfg.n_steps, "rcfg": cfg.rcfg, "rows": rows}


def run(a: argparse.Namespace) -> int:
    quick = a.quick
    sec = _sections(a.sections)
    n_frames = a.frames or (16 if quick else 160)
    repeats = a.repeats or (1 if quick else 3)
    load_frames = a.load_frames or (60 if quick else 1000)
    n_hostile = a.hostile if a.hostile is not None else (60 if quick else 2000)
    thread_list = [int(v) for v in a.thread_list.split(",") if v.strip()] if not quick else [1]
    out = a.out
    run = str(resolve_run(a.run))
    model = checkpoint.load(run)
    c, h, w = model.sample_shape
    label = a.label if getattr(model, "num_classes", None) else None
    move, hold = (10, 6) if quick else (24, 16)
    clip = builtin_clip(n_frames, h, c, move=move, hold=hold)
    t_start = time.time()
    cmd = a.command

    def cfg(mode, n, rcfg="none", filt=None):
        return {"mode": mode, "n": n, "rcfg": rcfg, "strength": a.strength, "guidance": a.guidance, "label": label,
                "filter": filt}

    ns = (1, 2, 4) if not quick else (1, 2)
    sb_cfgs = [cfg(m, n) for n in ns for m in ("sequential", "stream")]
    rcfg_modes = ("none", "self", "initialize", "full") if label is not None else ("none",)
    rc_ns = (2, 4) if not quick else (2,)
    rc_cfgs = [cfg("stream", n, r) for n in rc_ns for r in rcfg_modes] + [cfg("sequential", n, "full") for n in rc_ns]
    f_cfgs = [cfg("stream", 2, "self" if label is not None else "none", f) for f in (None, a.filter)]
    throughput, rcfg_rows, filter_rows = [], [], []
    for th in thread_list:
        if "batch" in sec:
            print(f"[bench stream] {th} thread(s): Stream Batch vs sequential", flush=True)
            throughput += _bench_configs(model, clip, sb_cfgs, repeats, th)
        if "rcfg" in sec:
            print(f"[bench stream] {th} thread(s): RCFG vs full CFG", flush=True)
            rcfg_rows += _bench_configs(model, clip, rc_cfgs, repeats, th)
    torch.set_num_threads(thread_list[0])
    if "filter" in sec:
        print("[bench stream] similarity filter", flush=True)
        filter_rows = _bench_configs(model, clip, f_cfgs, repeats, thread_list[0])
    mask = static_mask(n_frames, move, hold)
    sims = [cosine_similarity(clip[i], clip[i - 1]) for i in range(1, n_frames)]
    sim_moving = float(np.mean([s for s, m in zip(sims, mask[1:]) if not m])) if (~mask[1:]).any() else float("nan")
    motion: Dict[str, Any] = {}
    if "motion" in sec:
        ms = MotionStrength(0.3, 0.7, scale=0.05, smoothing=0.5)
        strengths, diffs = [], []
        for f in clip:
            strengths.append(ms.update(f))
            diffs.append(ms.last_diff)
        motion = {"strength": strengths, "diff": diffs, "static": mask.tolist(),
                  "mean_strength_static": float(np.mean([s for s, m in zip(strengths, mask) if m])) if mask.any() else None,
                  "mean_strength_moving": float(np.mean([s for s, m in zip(strengths, mask) if not m]))}

    cost: List[Dict[str, Any]] = []
    cost_ns = (1, 2, 4) if not quick else (1, 2)
    cost_rows = COST_ROWS if not quick else (1, 2, 3, 4)
    cost_reps = 2 if quick else 15
    large_spec = LARGE_SPEC_QUICK if quick else LARGE_SPEC
    if "cost" in sec:
        if a.rcfg_model in ("small", "both"):
            cost.append(_cost_section("small", model, clip, label, cost_ns, cost_rows, repeats, cost_reps,
                                      a.strength, a.guidance))
        if a.rcfg_model in ("large", "both"):
            big = _large_model(large_spec)
            bc, bh, _ = big.sample_shape
            lf = a.large_frames or (4 if quick else 32)
            big_clip = builtin_clip(lf, bh, bc, move=move, hold=hold)
            big_label = a.label % int(big.num_classes)
            cost.append(_cost_section("large", big, big_clip, big_label, cost_ns, cost_rows, repeats,
                                      2 if quick else 9, a.strength, a.guidance))
        torch.set_num_threads(thread_list[0])

    load: Dict[str, Any] = {}
    load_hi: Dict[str, Any] = {}
    if "load" in sec and not a.no_load_test:
        print(f"[bench stream] load test: {a.clients} clients x {load_frames} frames (default rate limit)", flush=True)
        load = _load_test(run, a.clients, load_frames, a.threads, None, quick, (c, h, w), n_hostile)
        if not quick:
            print("[bench stream] load test: rate limit lifted (queues alone bound the load)", flush=True)
            load_hi = _load_test(run, a.clients, load_frames, a.threads, 1e6, quick, (c, h, w), n_hostile)

    page: Dict[str, Any] = {}
    if "page" in sec:
        rates = [int(v) for v in a.page_send_fps.split(",") if v.strip()]
        rates = rates[-1:] if quick else rates  # quick: the last (highest) send rate only
        secs = a.page_seconds or (2.0 if quick else 20.0)
        print(f"[bench stream] page: headless Chromium at send rates {rates}, {secs:g} s each", flush=True)
        page = _page_fps(model, rates, secs, a.chromium, settle=0.5 if quick else 2.0)

    # ---- report
    def seq_of(r, rows):
        return next((b for b in rows if b["mode"] == "sequential" and b["n"] == r["n"] and b["rcfg"] == "none"
                     and b["threads"] == r["threads"]), None)

    def full_of(r, rows):
        return next((b for b in rows if b["mode"] == "stream" and b["rcfg"] == "full" and b["n"] == r["n"]
                     and b["threads"] == r["threads"]), None)

    report = Report("straightflow bench stream", cmd,
                    Timing(a.threads, warmup=1, repeats=repeats,
                           note=f"Throughput tables at {', '.join(map(str, thread_list))} thread(s); cost section at "
                                "1 thread; the load test and the page are timed live, once."),
                    quick=quick)
    md = [
          f"Sections: {', '.join(v for v in SECTIONS if v in sec)}  ",
          f"Model: `{run}` ({type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters, "
          f"shape {c}x{h}x{w}); clip: built-in moving shapes, {n_frames} frames ({move} moving / {hold} static); "
          f"strength {a.strength}, guidance {a.guidance}, label {label}; {repeats} timed repeat(s), median.", "",
          "Saturated throughput: frames pushed back to back (no producer pacing); latency = push of a frame to the "
          "return of the call that finishes it (Stream Batch adds the n - 1 later pushes a frame waits for). "
          "Calls/rows are per generated frame, counted by a wrapper around the model.", ""]
    if throughput:
        md += ["## Stream Batch vs sequential denoising (rcfg none)", "",
               _table(throughput, lambda r: seq_of(r, throughput), "sequential"), ""]
    if rcfg_rows:
        md += ["## RCFG variants vs full CFG (Stream Batch unless marked sequential)", "",
               _table(rcfg_rows, lambda r: full_of(r, rcfg_rows), "full CFG"), ""]
    if cost:
        large = next((R for R in cost if R["model"] == "large"), None)
        md += _cost_md(cost, cost_rows, repeats, a.guidance)
        notes = [f"Small model: the `--run` model above, on its {n_frames}-frame clip."]
        if large is not None:
            spec = {k: list(v) if isinstance(v, tuple) else v for k, v in large_spec.items()}
            notes.append(f"Large model: `UNet({', '.join(f'{k}={v}' for k, v in spec.items())})`, "
                         f"{large['parameters']:,} parameters, **randomly initialised (untrained, seed 0)**: a call's "
                         "time does not depend on the weights' values, so its throughput is that of a trained "
                         f"model of this size; its outputs are meaningless. Clip: built-in moving shapes at "
                         f"{'x'.join(map(str, large['shape']))}, {large['frames']} frames per timed run (label "
                         f"{a.label % int(large_spec['num_classes'])}). fps includes the n - 1 warm-up and flush "
                         "calls of each run (fewer rows) in whole-run fps, as in the tables above.")
        md += [" ".join(notes), "", "![rcfg cost](rcfg_cost.png)", ""]
    if filter_rows:
        md += [f"## Stochastic similarity filter (threshold {a.filter}, max 10 skips) on the clip with static stretches", "",
               _table(filter_rows, lambda r: filter_rows[0], "no filter"), "",
               f"Mean cosine similarity of consecutive frames: moving {sim_moving:.4f}, static 1.0 "
               f"({int(mask.sum())} of {n_frames} frames are static repeats). A skipped frame re-emits the last output "
               "and costs no model call; fps counts every emitted frame.", ""]
    if motion:
        md += ["## Motion-aware strength (StreamDiffusionV2)", "",
               f"strength = 0.7 - 0.4 * EMA_0.5(clip(mean|x_k - x_(k-1)| / 0.05, 0, 1)): mean strength "
               f"{motion['mean_strength_moving']:.3f} on moving frames, "
               f"{_fmt(motion['mean_strength_static'], 3)} on static ones (see stream.png, right).", ""]
    for title, L in (("default rate limit", load), ("rate limit lifted", load_hi)):
        if not L:
            continue
        s = L["server"]
        md += [f"## Load test ({title}): {L['clients']} clients x {L['frames_per_client']} frames over loopback", "",
               f"Server: `{L['command']}` (subprocess, rate limit {L['rate']:g} msg/s per client). "
               "Clients flood PNG frames as fast as the socket takes them while reading replies.", "",
               "| sent | frames in (accepted) | rate-limited | dropped stale (input queues) | dropped (output queues) | generated | delivered | delivered latency p50 / p99 (ms) | server latency p50 / p99 (ms) | RSS start / max / end (MB) | server alive after | wall (s) |",
               "|" + "---|" * 12,
               f"| {L['sent']} | {s['frames_in']} | {s['rate_limited']} | {s['dropped_stale']} | {s['dropped_out']} | "
               f"{s['processed']} | {L['received']} | {_fmt(L['delivered_latency_ms_p50'])} / {_fmt(L['delivered_latency_ms_p99'])} | "
               f"{_fmt(s['latency_ms_p50'])} / {_fmt(s['latency_ms_p99'])} | {L['rss_mb_start']:.0f} / {L['rss_mb_max']:.0f} / "
               f"{L['rss_mb_end']:.0f} | {'yes' if L['server_alive_after'] else 'NO'} | {L['seconds']:.1f} |", ""]
        md += [f"Frames: {'x'.join(map(str, L.get('frame_shape', [])))} PNGs (the model's shape). Tracebacks in the "
               f"server log: {L.get('server_tracebacks', 'n/a')}.", ""]
        H = L.get("hostile") or {}
        if H:
            md += [f"A fifth client flooded {H['sent']} hostile messages at the same time (not JSON, JSON nested "
                   "20,000 deep, Infinity / NaN / true in a frame's shape, boolean and fractional labels, a NaN "
                   f"strength, unechoable ids, binary junk): {H['error_replies']} error replies "
                   f"({H['rate_limit_notices']} of them rate-limit notices), connection "
                   f"{'still open (answered a ping)' if H['open_after'] else 'CLOSED, code ' + str(H['close_code'])} "
                   "afterwards.", ""]
    if page.get("skipped"):
        md += ["## The page in headless Chromium", "", f"Skipped: {page['skipped']}.", ""]
    elif page:
        md += ["## The page in headless Chromium", "",
               f"Chromium {page['chromium']} (headless, Playwright) on the served page, `serve`'s defaults (n = "
               f"{page['n_steps']}, RCFG {page['rcfg']}), streaming the built-in clip; {page['seconds']:g} s per send rate. "
               "Correlation: mean Pearson correlation of each generated frame's luminance with its input frame's "
               "(the page's own measure), and with the input 8 frames earlier.", "",
               "| send fps | output fps | round trip p50 / p99 (ms) | frames in | dropped stale | server latency p50 / p99 (ms, since start) | correlation (vs 8 frames earlier) |",
               "|---:|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {r['send_fps']} | {r['output_fps']:.1f} | {r['round_trip_ms']} | {r['frames_in']} | {r['dropped_stale']} | "
               f"{_fmt(r['server_latency_ms_p50'])} / {_fmt(r['server_latency_ms_p99'])} | "
               f"{_fmt(r['corr'], 2)} ({_fmt(r['corr_stale'], 2)}) |" for r in page["rows"]]
        md += [""]
    md += [f"Total bench time: {time.time() - t_start:.0f} s.", ""]
    if throughput or motion:
        md += ["![stream](stream.png)", ""]
        _plot(throughput, motion, out / "stream.png")
    if cost:
        _plot_cost(cost, out / "rcfg_cost.png")
    report.add(*md)
    report.write(out, "stream", {"command": cmd, "date": report.date, "machine": report.machine,
                                    "run": run, "frames": n_frames, "repeats": repeats,
                                    "sections": [v for v in SECTIONS if v in sec],
                                    "throughput": throughput + rcfg_rows + filter_rows, "stream_batch": throughput,
                                    "rcfg": rcfg_rows, "filter": filter_rows, "motion": motion, "load_test": load,
                                    "load_test_no_rate_limit": load_hi, "cost": cost, "page": page,
                                    "large_spec": {k: list(v) if isinstance(v, tuple) else v for k, v in large_spec.items()},
                                    "similarity_moving_mean": sim_moving})
    print(report.render())
    return 0


SUITE = register_suite("stream", "Stream Batch, residual CFG, similarity filter, motion-aware strength, server load test",
                       _arguments, run, doc=__doc__.split("\n\n")[0])


def main(argv: Optional[List[str]] = None) -> int:
    """``straightflow bench stream ARGS``."""
    return run_suite("stream", argv)
