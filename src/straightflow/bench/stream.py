"""``straightflow bench stream``: Stream Batch vs sequential denoising, RCFG vs full CFG, the
similarity filter on a clip with static stretches, motion-aware strength, and a websocket load test.

Everything runs in one process on the same model and clip (the load test starts
``straightflow serve`` in a subprocess on loopback). Throughput is measured saturated: frames are
pushed back to back into the pipeline (after a warm-up pass); a frame's latency is the time from
its push to the return of the call that finishes it (Stream Batch: n - 1 later pushes). Each
configuration is timed ``--repeats`` times in rotation and the median is reported, with ratios
taken inside the same run. Thread counts: ``--thread-list`` (default 1,2).
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
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

__all__ = ["main"]


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="straightflow bench stream", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the load-test server")
    p.add_argument("--thread-list", default="1,2", help="torch thread counts for the throughput tables")
    p.add_argument("--quick", action="store_true", help="tiny settings (well under a minute)")
    p.add_argument("--run", default="default", help="run directory, or 'default' (cached digits UNet)")
    p.add_argument("--frames", type=int, default=None, help="clip length (default 160, quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 1)")
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--label", type=int, default=3)
    p.add_argument("--filter", type=float, default=0.99, help="similarity threshold for the filter comparison")
    p.add_argument("--load-frames", type=int, default=None, help="frames per load-test client (default 1000, quick 60)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--no-load-test", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- throughput
def _time_pipeline(pipe, clip: torch.Tensor, filt=None) -> Dict[str, Any]:
    """Push the clip back to back; returns fps, latencies (s), calls/rows per output, skipped."""
    from ..stream.filter import SimilarityFilter  # noqa: F401  (type only)

    pipe.reset(seed=0)
    if filt is not None:
        filt.reset()
    calls0, rows0 = pipe.calls, pipe.rows
    arrivals: Dict[int, float] = {}
    lat: List[float] = []
    outputs = 0
    skipped = 0
    last = None
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
            r = pipe.push(f, meta=i)
            if r is not None:
                last = r.x
                outputs += 1
                lat.append(time.perf_counter() - arrivals.pop(r.meta))
        for r in pipe.flush():
            outputs += 1
            lat.append(time.perf_counter() - arrivals.pop(r.meta))
    dt = time.perf_counter() - t0
    gen = max(outputs - skipped, 1)
    return {"seconds": dt, "fps": outputs / dt, "lat": lat, "outputs": outputs, "skipped": skipped,
            "calls_per_frame": (pipe.calls - calls0) / gen, "rows_per_frame": (pipe.rows - rows0) / gen,
            "calls_per_output": (pipe.calls - calls0) / max(outputs, 1)}


def _bench_configs(model, clip, configs, repeats: int, threads: int) -> List[Dict[str, Any]]:
    from ..stream.filter import SimilarityFilter
    from ..stream.pipeline import StreamBatchPipeline

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
                     "latency_ms_p50": 1e3 * float(np.percentile(lat, 50)),
                     "latency_ms_p99": 1e3 * float(np.percentile(lat, 99)),
                     "calls_per_frame": med["calls_per_frame"], "rows_per_frame": med["rows_per_frame"],
                     "calls_per_output": med["calls_per_output"], "skipped": med["skipped"], "outputs": med["outputs"],
                     "frames": len(clip)})
    return rows


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


def _load_test(run: str, n_clients: int, n_frames: int, threads: int, rate: Optional[float], quick: bool) -> Dict[str, Any]:
    from ..stream.clips import builtin_clip
    from ..stream.server import encode_png

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
        clip = builtin_clip(64, 8)
        pngs = [encode_png(f) for f in clip]
        results: List[Dict[str, Any]] = [{} for _ in range(n_clients)]

        async def all_clients() -> None:
            await asyncio.gather(*[_client(f"ws://127.0.0.1:{port}/ws", [pngs[(i + k * 7) % len(pngs)] for i in range(n_frames)],
                                           results[k], idle_s=2.0) for k in range(n_clients)])

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
            rate=rate if rate is not None else stats["config"]["rate"],
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    r1 = [r for r in rows if r["threads"] == rows[0]["threads"] and r.get("filter") is None]
    labels = [f"{r['mode'][:3]} n={r['n']}\n{r['rcfg']}" for r in r1]
    axes[0].bar(range(len(r1)), [r["fps"] for r in r1], color=["#888" if r["mode"] == "sequential" else "#2a7" for r in r1])
    axes[0].set_xticks(range(len(r1)))
    axes[0].set_xticklabels(labels, fontsize=7)
    axes[0].set_ylabel("frames / s")
    axes[0].set_title(f"throughput ({rows[0]['threads']} thread(s)); grey = sequential")
    ax = axes[1]
    ax.plot(motion["diff"], label="mean |frame difference|", color="#888")
    ax.plot(motion["strength"], label="motion-aware strength", color="#c33")
    ax.fill_between(range(len(motion["static"])), 0, 1, where=motion["static"], alpha=0.1, color="b", label="static stretch")
    ax.set_xlabel("frame")
    ax.legend(fontsize=8)
    ax.set_title("StreamDiffusionV2 motion-aware strength on the built-in clip")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    a = _parse(argv)
    from .. import checkpoint
    from ..cli import machine_line
    from ..io import save_json
    from ..stream import resolve_run
    from ..stream.clips import builtin_clip, static_mask
    from ..stream.filter import cosine_similarity
    from ..stream.pipeline import MotionStrength

    quick = a.quick
    n_frames = a.frames or (16 if quick else 160)
    repeats = a.repeats or (1 if quick else 3)
    load_frames = a.load_frames or (60 if quick else 1000)
    thread_list = [int(v) for v in a.thread_list.split(",") if v.strip()] if not quick else [1]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run = str(resolve_run(a.run))
    model = checkpoint.load(run)
    c, h, w = model.sample_shape
    label = a.label if getattr(model, "num_classes", None) else None
    move, hold = (10, 6) if quick else (24, 16)
    clip = builtin_clip(n_frames, h, c, move=move, hold=hold)
    t_start = time.time()
    cmd = "straightflow bench stream " + " ".join(argv or [])

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
        print(f"[bench stream] {th} thread(s): Stream Batch vs sequential", flush=True)
        throughput += _bench_configs(model, clip, sb_cfgs, repeats, th)
        print(f"[bench stream] {th} thread(s): RCFG vs full CFG", flush=True)
        rcfg_rows += _bench_configs(model, clip, rc_cfgs, repeats, th)
    torch.set_num_threads(thread_list[0])
    print("[bench stream] similarity filter", flush=True)
    filter_rows = _bench_configs(model, clip, f_cfgs, repeats, thread_list[0])
    mask = static_mask(n_frames, move, hold)
    sims = [cosine_similarity(clip[i], clip[i - 1]) for i in range(1, n_frames)]
    sim_moving = float(np.mean([s for s, m in zip(sims, mask[1:]) if not m])) if (~mask[1:]).any() else float("nan")
    ms = MotionStrength(0.3, 0.7, scale=0.05, smoothing=0.5)
    strengths, diffs = [], []
    for f in clip:
        strengths.append(ms.update(f))
        diffs.append(ms.last_diff)
    motion = {"strength": strengths, "diff": diffs, "static": mask.tolist(),
              "mean_strength_static": float(np.mean([s for s, m in zip(strengths, mask) if m])) if mask.any() else None,
              "mean_strength_moving": float(np.mean([s for s, m in zip(strengths, mask) if not m]))}

    load: Dict[str, Any] = {}
    load_hi: Dict[str, Any] = {}
    if not a.no_load_test:
        print(f"[bench stream] load test: {a.clients} clients x {load_frames} frames (default rate limit)", flush=True)
        load = _load_test(run, a.clients, load_frames, a.threads, None, quick)
        if not quick:
            print("[bench stream] load test: rate limit lifted (queues alone bound the load)", flush=True)
            load_hi = _load_test(run, a.clients, load_frames, a.threads, 1e6, quick)

    # ---- report
    def seq_of(r, rows):
        return next((b for b in rows if b["mode"] == "sequential" and b["n"] == r["n"] and b["rcfg"] == "none"
                     and b["threads"] == r["threads"]), None)

    def full_of(r, rows):
        return next((b for b in rows if b["mode"] == "stream" and b["rcfg"] == "full" and b["n"] == r["n"]
                     and b["threads"] == r["threads"]), None)

    md = [f"# straightflow bench stream", "", f"Command: `{cmd}`  ", f"Date: {date.today().isoformat()}  ",
          f"Machine: {machine_line()} (throughput tables at {', '.join(map(str, thread_list))} thread(s))  ",
          f"Model: `{run}` ({type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters, "
          f"shape {c}x{h}x{w}); clip: built-in moving shapes, {n_frames} frames ({move} moving / {hold} static); "
          f"strength {a.strength}, guidance {a.guidance}, label {label}; {repeats} timed repeat(s), median.", "",
          "Saturated throughput: frames pushed back to back (no producer pacing); latency = push of a frame to the "
          "return of the call that finishes it (Stream Batch adds the n - 1 later pushes a frame waits for). "
          "Calls/rows are per generated frame, counted by a wrapper around the model.", "",
          "## Stream Batch vs sequential denoising (rcfg none)", "", _table(throughput, lambda r: seq_of(r, throughput), "sequential"), "",
          "## RCFG variants vs full CFG (Stream Batch unless marked sequential)", "",
          _table(rcfg_rows, lambda r: full_of(r, rcfg_rows), "full CFG"), "",
          f"## Stochastic similarity filter (threshold {a.filter}, max 10 skips) on the clip with static stretches", "",
          _table(filter_rows, lambda r: filter_rows[0], "no filter"), "",
          f"Mean cosine similarity of consecutive frames: moving {sim_moving:.4f}, static 1.0 "
          f"({int(mask.sum())} of {n_frames} frames are static repeats). A skipped frame re-emits the last output "
          "and costs no model call; fps counts every emitted frame.", "",
          "## Motion-aware strength (StreamDiffusionV2)", "",
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
    md += [f"Total bench time: {time.time() - t_start:.0f} s.", "", "![stream](stream.png)", ""]
    (out / "stream.md").write_text("\n".join(md))
    _plot(throughput, motion, out / "stream.png")
    save_json(out / "stream.json", {"command": cmd, "date": date.today().isoformat(), "machine": machine_line(),
                                    "run": run, "frames": n_frames, "repeats": repeats,
                                    "throughput": throughput + rcfg_rows + filter_rows, "stream_batch": throughput,
                                    "rcfg": rcfg_rows, "filter": filter_rows, "motion": motion, "load_test": load,
                                    "load_test_no_rate_limit": load_hi,
                                    "similarity_moving_mean": sim_moving})
    print("\n".join(md))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
