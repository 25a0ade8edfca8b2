"""FastAPI/uvicorn server: a websocket takes frames in and sends Stream Batch outputs back.

Endpoints: ``GET /`` (the page: synthetic clip or camera in, live output, fps/latency),
``GET /stats`` (JSON counters: frames in/out, stale frames dropped, rate-limited, rejected,
skipped, latency p50/p99), ``GET /health`` and the websocket ``/ws``.

Websocket protocol (JSON text messages; binary messages are accepted if they hold the same JSON):

- client -> server ``{"type": "frame", "id": 7, "ts": 1234.5, "image": "<base64 PNG, data URL allowed>"}``
  or ``{"type": "frame", "id": 7, "ts": ..., "data": [floats in [-1, 1]], "shape": [C, H, W]}``
  (raw arrays must have the model's shape; PNGs are converted to the model's channels and
  resized to its resolution). ``{"type": "config", "label": 3, "strength": 0.5}`` changes the
  class / strength of the frames that follow; ``{"type": "ping"}`` gets a ``pong``.
- server -> client ``{"type": "hello", ...}`` once, then ``{"type": "frame", "id", "ts"
  (echoed), "image" (base64 PNG), "latency_ms" (server receive -> send), "skipped", "strength"}``
  per generated frame, and ``{"type": "error", "error": "..."}`` for a bad message (the
  connection stays open).

Any message the server cannot use, whatever is wrong with it (not JSON, nested too deeply, a
shape of ``[Infinity, 8, 8]``, a label of ``true``, ...), gets an ``error`` message naming what was
wrong and what is accepted, and the connection stays open.

Origins: a browser page on another site must not drive the socket. By default (``allowed_origins``
None) a websocket whose ``Origin`` header is present is accepted only from the page's own origin
(the same scheme-less host and port as the request's ``Host``); ``allowed_origins`` lists other
origins to accept (``"*"``: any). Clients that send no ``Origin`` (scripts, the benchmarks) are
accepted: the check guards browsers, which always send one. A refused socket is closed with code
1008 (policy violation) before it is accepted.

Limits: messages over ``max_message_bytes`` get an error (uvicorn closes the connection above 4x
that), images over ``max_image_side`` pixels a side are refused before decoding, each client may
send ``rate`` messages/s (token bucket of ``burst``; excess frames are dropped and counted, with
at most one error notice per second), at most ``max_clients`` connections. One generator thread
serves every client in turn; each client has bounded latest-frame input and output queues, so
stale frames are dropped and counted and memory stays bounded under any load.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import io
import itertools
import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

import numpy as np
import torch

from .clips import frames_to_uint8
from .filter import SimilarityFilter
from .pipeline import MotionStrength, StreamBatchPipeline, canonical_rcfg
from .queues import LatestQueue, percentile

__all__ = ["ServerConfig", "StreamEngine", "create_app", "serve", "decode_frame", "encode_png", "FrameError",
           "check_port"]

STATIC = Path(__file__).parent / "static"

try:  # module level: FastAPI resolves the endpoint's (string) annotations in this module's globals
    from fastapi import WebSocket, WebSocketDisconnect
except ImportError:  # pragma: no cover - the `serve` extra is not installed
    WebSocket = WebSocketDisconnect = None  # type: ignore[assignment,misc]


@dataclass
class ServerConfig:
    n_steps: int = 2
    strength: float = 0.5
    rcfg: str = "self"
    guidance: float = 1.5
    delta: float = 1.0
    label: Optional[int] = 0
    filter_threshold: Optional[float] = None     # None: similarity filter off
    max_skip: int = 10
    motion: Optional[List[float]] = None         # [s_min, s_max]: motion-aware strength
    max_message_bytes: int = 256 * 1024
    max_image_side: int = 1024
    rate: float = 120.0                          # messages per second per client
    burst: int = 30
    in_queue: int = 2
    out_queue: int = 4
    max_clients: int = 16
    flush_after_s: float = 0.5                   # drain a client's in-flight frames after this idle time
    seed: int = 0
    allowed_origins: Optional[List[str]] = None  # None: the page's own origin only; ["*"]: any


class FrameError(ValueError):
    """A frame message that cannot be used (the text says why)."""


def encode_png(x: torch.Tensor) -> str:
    from PIL import Image

    a = frames_to_uint8(x)
    buf = io.BytesIO()
    Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_frame(msg: Dict[str, Any], shape: tuple, max_image_side: int = 1024) -> torch.Tensor:
    """A frame message -> ``(C, H, W)`` float32 in [-1, 1] of the model's ``shape``; FrameError otherwise."""
    c, h, w = shape
    if "image" in msg:
        s = msg["image"]
        if not isinstance(s, str):
            raise FrameError("'image' must be a base64 string (PNG), optionally a data: URL")
        if s.startswith("data:"):
            s = s.split(",", 1)[-1]
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise FrameError("'image' is not valid base64")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.format != "PNG":
                    raise FrameError(f"'image' must be a PNG, got {im.format}")
                if max(im.size) > max_image_side:
                    raise FrameError(f"image is {im.size[0]}x{im.size[1]}; at most {max_image_side} pixels a side")
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        except FrameError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise FrameError(f"'image' could not be decoded as PNG: {e}")
        t = torch.from_numpy(a[None].copy() if c == 1 else a.transpose(2, 0, 1).copy())
        return t
    if "data" in msg:
        data, shp = msg.get("data"), msg.get("shape")
        if not isinstance(shp, list) or [_int_or_none(v) for v in shp] != [c, h, w]:
            raise FrameError(f"'shape' must be [{c}, {h}, {w}] (the model's shape), got {_short(shp)}")
        if not isinstance(data, list) or len(data) != c * h * w:
            raise FrameError(f"'data' must be a flat list of {c * h * w} numbers")
        try:
            t = torch.tensor(data, dtype=torch.float32)
        except (TypeError, ValueError):
            raise FrameError("'data' must hold numbers only")
        if not bool(torch.isfinite(t).all()):
            raise FrameError("'data' holds NaN or Inf")
        return t.clamp(-1, 1).view(c, h, w)
    raise FrameError("a frame needs 'image' (base64 PNG) or 'data' + 'shape'")


def _int_or_none(v: Any) -> Optional[int]:
    """``v`` as an int when it is a whole, finite number (never a bool, NaN or Infinity), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _short(v: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = type(v).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def origin_allowed(origin: Optional[str], host: Optional[str], allowed: Optional[List[str]]) -> bool:
    """Whether a websocket from a page at ``origin`` may connect to a server reached as ``host``.

    No ``Origin`` (a script, not a browser): yes. ``allowed`` None: only the server's own origin
    (``http(s)://<host>``). Otherwise ``origin`` must be listed (``"*"`` accepts any)."""
    if origin is None:
        return True
    if allowed is not None and ("*" in allowed or origin.rstrip("/") in [o.rstrip("/") for o in allowed]):
        return True
    if allowed is None and host:
        return origin.rstrip("/") in (f"http://{host}", f"https://{host}")
    return False


def _echo(v: Any) -> Any:
    """A client's ``id``/``ts`` as it may be echoed back: a finite number, a short string, or None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return v
    if isinstance(v, str) and len(v) <= 128:
        return v
    raise FrameError("'id' and 'ts' must be finite numbers or short strings")


class _Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst, self.tokens, self.t = float(rate), float(burst), float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Session:
    def __init__(self, sid: int, pipeline: StreamBatchPipeline, filt: Optional[SimilarityFilter], cfg: ServerConfig,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.id = sid
        self.pipeline = pipeline
        self.filter = filt
        self.in_q = LatestQueue(cfg.in_queue)
        self.out_q = LatestQueue(cfg.out_queue)
        self.loop = loop
        self.event = asyncio.Event()
        self.bucket = _Bucket(cfg.rate, cfg.burst)
        self.last_output: Optional[torch.Tensor] = None
        self.last_input = time.monotonic()
        self.pending_config: Optional[Dict[str, Any]] = None
        self.lock = threading.Lock()
        self.closed = False
        self.c = collections.Counter()
        self.last_notice = 0.0

    def notify(self) -> None:
        if not self.closed:
            try:
                self.loop.call_soon_threadsafe(self.event.set)
            except RuntimeError:  # loop closed
                pass


class StreamEngine:
    """The generator thread shared by all clients, with their sessions and counters."""

    def __init__(self, model: Any, cfg: ServerConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.shape = tuple(int(v) for v in (getattr(model, "sample_shape", None) or (1, 8, 8)))
        self.sessions: Dict[int, _Session] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.totals = collections.Counter()
        self.latencies: Deque[float] = collections.deque(maxlen=2000)
        self.started_at = time.time()
        self.errors: Deque[str] = collections.deque(maxlen=20)
        canonical_rcfg(cfg.rcfg)  # fail early on a bad name
        self.new_pipeline()  # validates label/strength against the model

    # ---------------------------------------------------------------- sessions
    def new_pipeline(self) -> StreamBatchPipeline:
        c = self.cfg
        motion = MotionStrength(c.motion[0], c.motion[1]) if c.motion else None
        label = c.label if getattr(self.model, "num_classes", None) else None
        return StreamBatchPipeline(self.model, c.n_steps, c.strength, rcfg=c.rcfg, guidance=c.guidance, delta=c.delta,
                                   label=label, seed=c.seed, motion=motion)

    def open(self, loop: asyncio.AbstractEventLoop) -> Optional[_Session]:
        with self._lock:
            if len(self.sessions) >= self.cfg.max_clients:
                self.totals["refused_clients"] += 1
                return None
            filt = SimilarityFilter(self.cfg.filter_threshold, self.cfg.max_skip, seed=self.cfg.seed) \
                if self.cfg.filter_threshold is not None else None
            s = _Session(next(self._ids), self.new_pipeline(), filt, self.cfg, loop)
            self.sessions[s.id] = s
            self.totals["clients_total"] += 1
        self.start()
        return s

    def close(self, s: _Session) -> None:
        s.closed = True
        s.in_q.close()
        with self._lock:
            if self.sessions.pop(s.id, None) is None:
                return
            self.totals["dropped_stale"] += s.in_q.dropped
            self.totals["dropped_out"] += s.out_q.dropped
            for k in ("skipped", "processed", "withheld_warmup"):
                self.totals[k] += s.c[k]

    # ---------------------------------------------------------------- thread
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="stream-generator", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            with self._lock:
                sessions = list(self.sessions.values())
            for s in sessions:
                try:
                    item = s.in_q.get_nowait()
                    if item is None:
                        if s.pipeline.in_flight and time.monotonic() - s.last_input > self.cfg.flush_after_s:
                            self._flush(s)
                        continue
                    busy = True
                    self._process(s, item)
                except Exception as e:  # never let one client's frame kill the generator
                    self.errors.append(f"client {s.id}: {e!r}")
                    self.totals["generator_errors"] += 1
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def _apply_config(self, s: _Session) -> None:
        with s.lock:
            cfg, s.pending_config = s.pending_config, None
        if cfg:
            if "label" in cfg:
                s.pipeline.set_label(cfg["label"])
            if "strength" in cfg:
                s.pipeline.set_strength(cfg["strength"])

    def _process(self, s: _Session, item: Dict[str, Any]) -> None:
        self._apply_config(s)
        frame = item["frame"]
        if s.filter is not None and s.last_output is not None and not s.filter(frame):
            s.c["skipped"] += 1
            self._deliver(s, s.last_output, item, skipped=True, strength=float("nan"))
            return
        if s.filter is not None and s.last_output is None:
            s.filter(frame)
        s.c["processed"] += 1
        out = s.pipeline.push(frame, meta=item)
        if out is None:
            s.c["withheld_warmup"] += 1
            return
        s.last_output = out.x
        self._deliver(s, out.x, out.meta, skipped=False, strength=out.strength)

    def _flush(self, s: _Session) -> None:
        for out in s.pipeline.flush():
            s.last_output = out.x
            s.c["flushed"] += 1
            self._deliver(s, out.x, out.meta, skipped=False, strength=out.strength)

    def _deliver(self, s: _Session, x: torch.Tensor, item: Dict[str, Any], skipped: bool, strength: float) -> None:
        msg = {"type": "frame", "id": item.get("id"), "ts": item.get("ts"), "image": encode_png(x),
               "skipped": skipped, "strength": None if math.isnan(strength) else round(strength, 4),
               "t_recv": item["t_recv"]}
        s.out_q.put(msg)
        s.notify()

    # ---------------------------------------------------------------- stats
    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            sessions = list(self.sessions.values())
        per = []
        agg = collections.Counter()
        for s in sessions:
            d = dict(s.c)
            d.update(id=s.id, dropped_stale=s.in_q.dropped, dropped_out=s.out_q.dropped,
                     in_queue=len(s.in_q), out_queue=len(s.out_q), in_flight=s.pipeline.in_flight)
            per.append(d)
            for k, v in s.c.items():
                agg[k] += v
            agg["dropped_stale"] += s.in_q.dropped
            agg["dropped_out"] += s.out_q.dropped
        tot = collections.Counter(self.totals)
        lat = list(self.latencies)
        return {
            "clients_connected": len(sessions), "clients_total": tot["clients_total"],
            "refused_clients": tot["refused_clients"], "refused_origin": tot["refused_origin"],
            "frames_in": tot["frames_in"], "frames_out": tot["frames_out"],
            "dropped_stale": tot["dropped_stale"] + agg["dropped_stale"],
            "dropped_out": tot["dropped_out"] + agg["dropped_out"],
            "rate_limited": tot["rate_limited"], "rejected": tot["rejected"],
            "skipped": tot["skipped"] + agg["skipped"], "processed": tot["processed"] + agg["processed"],
            "withheld_warmup": tot["withheld_warmup"] + agg["withheld_warmup"],
            "generator_errors": tot["generator_errors"], "recent_errors": list(self.errors),
            "latency_ms_p50": 1e3 * percentile(lat, 50) if lat else None,
            "latency_ms_p99": 1e3 * percentile(lat, 99) if lat else None,
            "uptime_s": time.time() - self.started_at,
            "config": asdict(self.cfg), "clients": per,
        }


def create_app(model: Any, cfg: Optional[ServerConfig] = None):
    """The FastAPI app serving ``model`` (a velocity model with ``sample_shape``) with settings ``cfg``."""
    if WebSocket is None:
        raise ValueError("the server needs FastAPI and uvicorn: pip install 'straightflow[serve]'")
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse

    cfg = cfg or ServerConfig()
    engine = StreamEngine(model, cfg)
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="straightflow stream", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    page = (STATIC / "index.html").read_text()

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(engine.stats())

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), cfg.allowed_origins):
            engine.totals["refused_origin"] += 1
            await ws.close(code=1008)  # before accept: the handshake is refused (HTTP 403)
            return
        await ws.accept()
        loop = asyncio.get_running_loop()
        s = engine.open(loop)
        if s is None:
            await ws.send_text(json.dumps({"type": "error", "error": f"server full ({cfg.max_clients} clients)"}))
            await ws.close(code=1013)
            return
        send_lock = asyncio.Lock()

        async def send(obj: Dict[str, Any]) -> None:
            async with send_lock:
                await ws.send_text(json.dumps(obj))

        async def error(text: str) -> None:
            engine.totals["rejected"] += 1
            await send({"type": "error", "error": text})

        async def sender() -> None:
            while True:
                await s.event.wait()
                s.event.clear()
                while (msg := s.out_q.get_nowait()) is not None:
                    now = time.perf_counter()
                    lat = now - msg.pop("t_recv")
                    msg["latency_ms"] = round(1e3 * lat, 3)
                    engine.record_latency(lat)
                    engine.totals["frames_out"] += 1
                    await send(msg)

        c, h, w = engine.shape
        await send({"type": "hello", "client": s.id, "shape": [c, h, w], "n_steps": cfg.n_steps, "rcfg": cfg.rcfg,
                    "strength": cfg.strength, "label": cfg.label, "num_classes": getattr(model, "num_classes", None),
                    "max_message_bytes": cfg.max_message_bytes, "rate": cfg.rate})

        async def handle(raw) -> None:
            """One message; FrameError (-> an error message) for anything unusable."""
            try:
                msg = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FrameError(f"malformed message: not JSON ({e.__class__.__name__})")
            except RecursionError:
                raise FrameError("malformed message: JSON nested too deeply")
            if not isinstance(msg, dict) or "type" not in msg:
                raise FrameError("malformed message: expected a JSON object with a 'type' (frame, config, ping)")
            kind = msg["type"]
            if kind == "frame":
                try:
                    frame = decode_frame(msg, engine.shape, cfg.max_image_side)
                    fid, ts = _echo(msg.get("id")), _echo(msg.get("ts"))
                except FrameError as e:
                    raise FrameError(f"bad frame: {e}")
                item = {"frame": frame, "id": fid, "ts": ts if isinstance(ts, (int, float)) else None,
                        "t_recv": time.perf_counter()}
                engine.totals["frames_in"] += 1
                s.last_input = time.monotonic()
                s.in_q.put(item)  # latest-frame policy: a full queue drops its stalest frame (counted)
                engine.wake()
            elif kind == "config":
                upd: Dict[str, Any] = {}
                try:
                    if "label" in msg:
                        lab = msg["label"]
                        nc = getattr(model, "num_classes", None)
                        if not nc or _int_or_none(lab) is None or isinstance(lab, float) or not 0 <= lab < nc:
                            raise FrameError(f"label must be an integer in [0, {nc}), got {_short(lab)}" if nc
                                             else "this model has no classes")
                        upd["label"] = lab
                    if "strength" in msg:
                        st = msg["strength"]
                        if isinstance(st, bool) or not isinstance(st, (int, float)) or not 0.0 < float(st) < 1.0:
                            raise FrameError(f"strength must be a number in (0, 1), got {_short(st)}")
                        upd["strength"] = float(st)
                except FrameError as e:
                    raise FrameError(f"bad config: {e}")
                with s.lock:
                    s.pending_config = {**(s.pending_config or {}), **upd}
                await send({"type": "config", "ok": True, **upd})
            elif kind == "ping":
                await send({"type": "pong", "ts": _echo(msg.get("ts"))})
            else:
                raise FrameError(f"unknown message type {_short(kind)}; valid: frame, config, ping")

        task = asyncio.create_task(sender())
        try:
            while True:
                m = await ws.receive()
                if m["type"] == "websocket.disconnect":
                    break
                raw = m.get("text")
                if raw is None:
                    raw = m.get("bytes") or b""
                size = len(raw.encode() if isinstance(raw, str) else raw)
                if not s.bucket.take():
                    engine.totals["rate_limited"] += 1
                    now = time.monotonic()
                    if now - s.last_notice > 1.0:
                        s.last_notice = now
                        await send({"type": "error", "error": f"rate limit: at most {cfg.rate:g} messages/s "
                                    f"(burst {cfg.burst}); excess frames are dropped", "rate_limited": True})
                    continue
                if size > cfg.max_message_bytes:
                    await error(f"message too large: {size} bytes > limit {cfg.max_message_bytes}")
                    continue
                try:
                    await handle(raw)
                except FrameError as e:
                    await error(str(e))
                except (WebSocketDisconnect, asyncio.CancelledError):
                    raise
                except Exception as e:  # never cut a connection over one message: say what went wrong
                    engine.errors.append(f"client {s.id}: {e!r}")
                    await error(f"could not handle the message ({e.__class__.__name__}); it was dropped")
        except WebSocketDisconnect:
            pass
        finally:
            task.cancel()
            engine.close(s)

    return app


def check_port(port: Any) -> int:
    """``port`` as a TCP port number (1-65535), else ``ValueError`` saying so (checked before any work)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1-65535, got {port!r}")
    return int(port)


def serve(model: Any, cfg: Optional[ServerConfig] = None, host: str = "127.0.0.1", port: int = 8765,
          log_level: str = "warning") -> None:
    """Run the app with uvicorn (blocking). Binds to 127.0.0.1 unless told otherwise."""
    port = check_port(port)
    import uvicorn

    cfg = cfg or ServerConfig()
    app = create_app(model, cfg)
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=4 * cfg.max_message_bytes,
                ws_ping_interval=20.0, ws_ping_timeout=20.0)
