"""The server load test: clients flooding frames over loopback websockets, and a hostile client (a fuzzer of
malformed messages) at the same time; the server runs as a subprocess."""
from __future__ import annotations

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

from straightflow.stream.clips import builtin_clip
from straightflow.stream.server import encode_png


def free_port() -> int:
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


def http_json(url: str) -> Any:
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


def run_load_test(run: str, n_clients: int, n_frames: int, threads: int, rate: Optional[float], quick: bool,
               shape=(1, 8, 8), n_hostile: int = 0) -> Dict[str, Any]:
    """``n_clients`` flood PNG frames of the model's ``shape`` (C, H, W) at ``straightflow serve``;
    with ``n_hostile`` > 0 one more client floods that many hostile messages at the same time."""

    port = free_port()
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
                http_json(base + "/health")
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
        stats = http_json(base + "/stats")
        alive = http_json(base + "/health").get("status") == "ok" and proc.poll() is None
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


