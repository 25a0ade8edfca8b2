"""``straightflow serve RUN`` (websocket server + page) and ``straightflow stream RUN`` (offline clip -> PNGs + latency report).

``RUN`` is a run directory of a trained image flow, or ``default`` for the cached
class-conditional digits UNet (trained once on first use, see :func:`straightflow.stream.default_run`).
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .pipeline import RCFG_MODES

__all__ = ["register", "cmd_serve", "cmd_stream", "run_stream", "load_stream_model"]


def _floats2(s: str) -> List[float]:
    try:
        v = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S_MIN,S_MAX, got {s!r}")
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers S_MIN,S_MAX, got {s!r}")
    return v


def load_stream_model(run: str):
    from .. import checkpoint
    from . import resolve_run

    model = checkpoint.load(resolve_run(run))
    shape = getattr(model, "sample_shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"streaming needs an image model (C, H, W); the model of {run} has sample shape {shape}")
    return model


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of a trained image flow, or 'default' (cached digits UNet)")
    p.add_argument("--n-steps", type=int, default=2, help="Euler steps per frame (= Stream Batch rows)")
    p.add_argument("--strength", type=float, default=0.5, help="img2img strength: frames are noised to t = 1 - strength")
    p.add_argument("--rcfg", default="self", help=f"residual CFG: {', '.join(RCFG_MODES)}")
    p.add_argument("--guidance", type=float, default=1.5, help="guidance scale gamma (rcfg self/initialize/full)")
    p.add_argument("--delta", type=float, default=1.0, help="RCFG negative-noise scale delta")
    p.add_argument("--label", type=int, default=0, help="class label for a class-conditional model")
    p.add_argument("--filter", type=float, default=None, metavar="THRESHOLD",
                   help="stochastic similarity filter threshold (e.g. 0.95); off by default")
    p.add_argument("--max-skip", type=int, default=10, help="similarity filter: most consecutive skipped frames")
    p.add_argument("--motion", type=_floats2, default=None, metavar="S_MIN,S_MAX",
                   help="motion-aware strength in [S_MIN, S_MAX] (StreamDiffusionV2) instead of --strength")
    p.add_argument("--seed", type=int, default=0)


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a stream: websocket /ws + a page with live output, fps and latency")
    _common(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--max-message-kb", type=int, default=256, help="largest accepted websocket message")
    s.add_argument("--rate", type=float, default=120.0, help="messages per second per client (token bucket)")
    s.add_argument("--burst", type=int, default=30)
    s.add_argument("--max-clients", type=int, default=16)
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_serve)

    t = sub.add_parser("stream", help="stream a clip offline through Stream Batch: PNG sequence + latency report")
    _common(t)
    t.add_argument("--clip", default="builtin", help="builtin, builtin:shapes, builtin:digits, or a folder of images")
    t.add_argument("--frames", type=int, default=120, help="frames of the built-in clip (or the first N images)")
    t.add_argument("--out", required=True, help="output directory (frames/NNNNN.png, latency.md, latency.json)")
    t.add_argument("--fps", type=float, default=0.0,
                   help="producer rate; 0 = offline (every frame processed), >0 = real time with stale frames dropped")
    t.add_argument("--scale", type=int, default=8, help="upscale factor of the written PNGs (nearest neighbour)")
    t.set_defaults(fn=cmd_stream)


def _check(a) -> None:
    if a.n_steps < 1:
        raise ValueError(f"--n-steps must be >= 1, got {a.n_steps}")
    if not 0.0 < a.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {a.strength}")


def cmd_serve(a) -> int:
    from .server import ServerConfig, serve

    _check(a)
    model = load_stream_model(a.run)
    cfg = ServerConfig(n_steps=a.n_steps, strength=a.strength, rcfg=a.rcfg, guidance=a.guidance, delta=a.delta,
                       label=a.label, filter_threshold=a.filter, max_skip=a.max_skip, motion=a.motion,
                       max_message_bytes=1024 * a.max_message_kb, rate=a.rate, burst=a.burst,
                       max_clients=a.max_clients, seed=a.seed)
    print(f"straightflow serve: http://{a.host}:{a.port}/  (websocket /ws, stats /stats); torch threads "
          f"{torch.get_num_threads()}", flush=True)
    serve(model, cfg, host=a.host, port=a.port, log_level=a.log_level)
    return 0


def run_stream(model, clip: torch.Tensor, out: str, *, n_steps: int = 2, strength: float = 0.5, rcfg: str = "self",
               guidance: float = 1.5, delta: float = 1.0, label: Optional[int] = 0, filter_threshold: Optional[float] = None,
               max_skip: int = 10, motion: Optional[List[float]] = None, fps: float = 0.0, seed: int = 0,
               scale: int = 8, command: str = "") -> Dict[str, Any]:
    """Run ``clip`` through producer -> Stream Batch -> consumer threads; write PNGs and a latency report."""
    from PIL import Image

    from ..cli import machine_line
    from ..io import save_json
    from .clips import frames_to_uint8
    from .filter import SimilarityFilter
    from .pipeline import MotionStrength, StreamBatchPipeline
    from .queues import StreamRunner

    out_dir = Path(out)
    frames_dir = out_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    lab = label if getattr(model, "num_classes", None) else None
    pipe = StreamBatchPipeline(model, n_steps, strength, rcfg=rcfg, guidance=guidance, delta=delta, label=lab, seed=seed,
                               motion=MotionStrength(*motion) if motion else None)
    filt = SimilarityFilter(filter_threshold, max_skip, seed=seed) if filter_threshold is not None else None
    written: List[int] = []

    def sink(d) -> None:
        a = frames_to_uint8(d.x)
        im = Image.fromarray(a)
        if scale > 1:
            im = im.resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
        im.save(frames_dir / f"{len(written):05d}.png")
        written.append(d.index)

    clip = clip.to(pipe.dtype)
    with torch.no_grad():
        stats = StreamRunner(pipe, list(clip), sink, filter=filt, fps=fps).run()
    summ = stats.summary()
    summ.update(n_steps=n_steps, strength=strength, rcfg=rcfg, guidance=guidance, filter=filter_threshold,
                motion=motion, fps_in=fps, frames=len(clip), written=len(written), input_index=written,
                rows_per_call_steady=pipe.rows_per_call, latencies_ms=[1e3 * v for v in stats.latencies])
    save_json(out_dir / "latency.json", summ)
    md = [f"# straightflow stream report", "", f"Command: `{command}`" if command else "", f"Date {date.today().isoformat()}; {machine_line()}", "",
          f"{len(clip)} input frames, Stream Batch n = {n_steps}, rcfg {rcfg} (guidance {guidance}), "
          f"strength {'motion-aware ' + str(motion) if motion else strength}, similarity filter "
          f"{filter_threshold if filter_threshold is not None else 'off'}, producer "
          f"{'offline (back-pressure)' if not fps else f'{fps:g} fps (latest-frame queues)'}.", "",
          "| frames in | processed | skipped (filter) | dropped (stale) | written | delivered fps | latency p50 (ms) | latency p99 (ms) | model calls / processed frame | rows / processed frame |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
          f"| {summ['produced']} | {summ['processed']} | {summ['skipped']} | {summ['dropped_in'] + summ['dropped_out']} | "
          f"{len(written)} | {summ['fps_delivered']:.1f} | {summ['latency_ms_p50']:.2f} | {summ['latency_ms_p99']:.2f} | "
          f"{summ['calls_per_processed_frame']:.2f} | {summ['rows_per_processed_frame']:.2f} |", "",
          "Latency: from the producer handing a frame to the input queue to the consumer receiving its output "
          "(with Stream Batch this includes the n - 1 later frames a frame waits for).", ""]
    (out_dir / "latency.md").write_text("\n".join(md))
    if stats.errors:
        raise ValueError(f"stream failed: {'; '.join(stats.errors)}")
    return summ


def cmd_stream(a) -> int:
    import sys

    from .clips import load_clip

    _check(a)
    model = load_stream_model(a.run)
    c, h, w = model.sample_shape
    clip = load_clip(a.clip, h, c, n_frames=a.frames, seed=a.seed)
    summ = run_stream(model, clip, a.out, n_steps=a.n_steps, strength=a.strength, rcfg=a.rcfg, guidance=a.guidance,
                      delta=a.delta, label=a.label, filter_threshold=a.filter, max_skip=a.max_skip, motion=a.motion,
                      fps=a.fps, seed=a.seed, scale=a.scale, command="straightflow " + " ".join(sys.argv[1:]))
    print((Path(a.out) / "latency.md").read_text())
    print(f"{summ['written']} frames written to {Path(a.out) / 'frames'}")
    return 0
