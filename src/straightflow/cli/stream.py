"""``straightflow serve RUN`` (websocket server + page) and ``straightflow stream RUN`` (offline clip -> PNGs + latency report).

``RUN`` is a run directory of a trained image flow, or ``default`` for the cached
class-conditional UNet on moving shapes (32x32, trained once on first use with a message and a
progress bar, then reused; see :func:`straightflow.stream.default_run`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..stream import load_stream_model, run_stream
from ..stream.clips import load_clip
from ..stream.pipeline import RCFG_MODES
from ..stream.server import ServerConfig, check_port, serve
from . import flags


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of a trained image flow, or 'default' (the cached 32x32 shapes UNet, "
                   "trained on first use)")
    p.add_argument("--n-steps", type=int, default=2, help="Euler steps per frame (= Stream Batch rows)")
    p.add_argument("--strength", type=float, default=0.5, help="img2img strength: frames are noised to t = 1 - strength")
    p.add_argument("--rcfg", default="self", help=f"residual CFG: {', '.join(RCFG_MODES)}")
    p.add_argument("--guidance", type=float, default=1.5, help="guidance scale gamma (rcfg self/initialize/full)")
    p.add_argument("--delta", type=float, default=1.0, help="RCFG negative-noise scale delta")
    p.add_argument("--label", type=int, default=0, help="class label for a class-conditional model")
    p.add_argument("--filter", type=float, default=None, metavar="THRESHOLD",
                   help="stochastic similarity filter threshold (e.g. 0.95); off by default")
    p.add_argument("--max-skip", type=int, default=10, help="similarity filter: most consecutive skipped frames")
    p.add_argument("--motion", type=flags.float_pair, default=None, metavar="S_MIN,S_MAX",
                   help="motion-aware strength in [S_MIN, S_MAX] (StreamDiffusionV2) instead of --strength")
    flags.add_seed(p)
    flags.add_device(p)
    flags.add_quiet(p)


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a stream: websocket /ws + a page with live output, fps and latency")
    _common(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--max-message-kb", type=int, default=256, help="largest accepted websocket message")
    s.add_argument("--rate", type=float, default=120.0, help="messages per second per client (token bucket)")
    s.add_argument("--burst", type=int, default=30)
    s.add_argument("--max-clients", type=int, default=16)
    s.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="also accept websockets from pages at ORIGIN (e.g. http://example.org:8000; '*' for any); "
                   "by default only the page's own origin (and clients sending no Origin) may connect")
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


def _model(a):
    return load_stream_model(a.run, device=flags.device(a), progress=not a.quiet, log=_say)


def _say(msg: str) -> None:
    print(f"[stream] {msg}", flush=True)


def cmd_serve(a) -> int:
    _check(a)
    check_port(a.port)  # every setting is checked before the (possibly long) model loading or training
    cfg = ServerConfig(n_steps=a.n_steps, strength=a.strength, rcfg=a.rcfg, guidance=a.guidance, delta=a.delta,
                       label=a.label, filter_threshold=a.filter, max_skip=a.max_skip, motion=a.motion,
                       max_message_bytes=1024 * a.max_message_kb, rate=a.rate, burst=a.burst,
                       max_clients=a.max_clients, seed=a.seed, allowed_origins=a.allow_origin)
    model = _model(a)
    print(f"straightflow serve: http://{a.host}:{a.port}/  (websocket /ws, stats /stats); torch threads "
          f"{torch.get_num_threads()}", flush=True)
    serve(model, cfg, host=a.host, port=a.port, log_level=a.log_level)
    return 0


def cmd_stream(a) -> int:
    _check(a)
    model = _model(a)
    c, h, w = model.sample_shape
    clip = load_clip(a.clip, h, c, n_frames=a.frames, seed=a.seed)
    summ = run_stream(model, clip, a.out, n_steps=a.n_steps, strength=a.strength, rcfg=a.rcfg, guidance=a.guidance,
                      delta=a.delta, label=a.label, filter_threshold=a.filter, max_skip=a.max_skip, motion=a.motion,
                      fps=a.fps, seed=a.seed, scale=a.scale, command=a.command)
    print((Path(a.out) / "latency.md").read_text())
    print(f"{summ['written']} frames written to {Path(a.out) / 'frames'}")
    return 0
