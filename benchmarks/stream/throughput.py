"""Saturated throughput of the streaming pipeline (Stream Batch, RCFG, similarity filter): fps, latency, calls."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from straightflow.stream.filter import SimilarityFilter
from straightflow.stream.pipeline import StreamBatchPipeline


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


def bench_configs(model, clip, configs, repeats: int, threads: int) -> List[Dict[str, Any]]:

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


