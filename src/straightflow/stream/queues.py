"""Bounded latest-frame queues and the producer -> generator -> consumer stream runner.

StreamDiffusion's input/output queues decouple the camera, the denoiser and the display. Here
every queue is bounded: with the *latest-frame* policy a ``put`` on a full queue evicts the
OLDEST item (a stale frame) and counts it in ``dropped``, so a slow generator sees the freshest
frames and memory never grows; ``put(block=True)`` instead waits for room (back-pressure, used
for offline runs that must keep every frame).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional

import numpy as np
import torch

from .filter import SimilarityFilter
from .pipeline import StreamBatchPipeline

__all__ = ["LatestQueue", "QueueClosed", "StreamRunner", "RunStats", "Delivered", "percentile"]


class QueueClosed(Exception):
    """get() on a closed, empty queue."""


class LatestQueue:
    """Thread-safe bounded FIFO; when full, ``put`` drops the oldest item (counted) unless ``block=True``."""

    def __init__(self, maxsize: int = 2) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"queue maxsize must be an integer >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._items: Deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.put_count = 0
        self.dropped = 0
        self.got = 0
        self.high_water = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: Any, block: bool = False, timeout: Optional[float] = None) -> Optional[Any]:
        """Add ``item``; returns the evicted stale item (latest policy) or ``None``."""
        with self._cond:
            if self._closed:
                raise QueueClosed("put() on a closed queue")
            evicted = None
            if len(self._items) >= self.maxsize:
                if block:
                    if not self._cond.wait_for(lambda: len(self._items) < self.maxsize or self._closed, timeout):
                        raise TimeoutError("queue stayed full")
                    if self._closed:
                        raise QueueClosed("queue closed while waiting for room")
                else:
                    evicted = self._items.popleft()
                    self.dropped += 1
            self._items.append(item)
            self.put_count += 1
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify_all()
            return evicted

    def get(self, timeout: Optional[float] = None) -> Any:
        """Oldest item; waits up to ``timeout`` (``TimeoutError``); ``QueueClosed`` once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                raise TimeoutError("queue empty")
            if not self._items:
                raise QueueClosed("queue closed")
            self.got += 1
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def get_nowait(self) -> Optional[Any]:
        with self._cond:
            if not self._items:
                return None
            self.got += 1
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def percentile(values: Iterable[float], q: float) -> float:
    v = list(values)
    return float(np.percentile(v, q)) if v else float("nan")


@dataclass
class Delivered:
    """A frame handed to the consumer: output image, the input index it answers, timings (seconds)."""

    x: torch.Tensor
    index: int
    produced_at: float
    delivered_at: float
    skipped: bool
    strength: float

    @property
    def latency(self) -> float:
        return self.delivered_at - self.produced_at


@dataclass
class RunStats:
    produced: int = 0
    dropped_in: int = 0
    dropped_out: int = 0
    skipped: int = 0
    processed: int = 0
    withheld_warmup: int = 0
    delivered: int = 0
    calls: int = 0
    rows: int = 0
    seconds: float = 0.0
    latencies: List[float] = field(default_factory=list)
    queue_high_water: Dict[str, int] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        gen = max(self.processed - 0, 1)
        return {
            "produced": self.produced, "dropped_in": self.dropped_in, "dropped_out": self.dropped_out,
            "skipped": self.skipped, "processed": self.processed, "withheld_warmup": self.withheld_warmup,
            "delivered": self.delivered, "calls": self.calls, "rows": self.rows,
            "calls_per_processed_frame": self.calls / gen, "rows_per_processed_frame": self.rows / gen,
            "seconds": self.seconds, "fps_delivered": self.delivered / self.seconds if self.seconds else float("nan"),
            "latency_ms_p50": 1e3 * percentile(self.latencies, 50), "latency_ms_p99": 1e3 * percentile(self.latencies, 99),
            "queue_high_water": dict(self.queue_high_water), "errors": list(self.errors),
        }


class StreamRunner:
    """Producer thread -> input queue -> generator thread (filter + pipeline) -> output queue -> consumer thread.

    ``frames`` is any iterable of ``(C, H, W)`` tensors; ``fps`` paces the producer (``None``: as
    fast as it can, flooding the generator; ``0``: offline, back-pressure, nothing dropped).
    ``sink(delivered)`` runs in the consumer thread. A skipped frame (similarity filter)
    re-emits the last output; frames still in the Stream Batch buffer at the end are flushed.
    """

    def __init__(self, pipeline: StreamBatchPipeline, frames: Iterable[torch.Tensor],
                 sink: Optional[Callable[[Delivered], None]] = None, *, filter: Optional[SimilarityFilter] = None,
                 fps: Optional[float] = None, in_size: int = 2, out_size: int = 4, flush: bool = True) -> None:
        self.pipeline, self.frames, self.sink, self.filter = pipeline, frames, sink, filter
        self.fps = fps
        self.offline = fps == 0
        self.in_q = LatestQueue(in_size)
        self.out_q = LatestQueue(out_size)
        self.flush = flush
        self.stats = RunStats()
        self._lock = threading.Lock()

    def _produce(self) -> None:
        try:
            period = 1.0 / self.fps if self.fps else 0.0
            nxt = time.perf_counter()
            for i, f in enumerate(self.frames):
                if period:
                    nxt += period
                    delay = nxt - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                self.in_q.put((i, f, time.perf_counter()), block=self.offline)
                self.stats.produced += 1
        except Exception as e:  # pragma: no cover - reported in stats
            self.stats.errors.append(f"producer: {e!r}")
        finally:
            self.in_q.close()

    def _generate(self) -> None:
        last: Optional[torch.Tensor] = None
        p = self.pipeline
        try:
            while True:
                try:
                    i, f, t_in = self.in_q.get()
                except QueueClosed:
                    break
                if self.filter is not None and last is not None and not self.filter(f):
                    self.stats.skipped += 1
                    self._out(Delivered(last, i, t_in, 0.0, True, float("nan")))
                    continue
                if self.filter is not None and last is None:
                    self.filter(f)  # first frame: becomes the filter's reference
                self.stats.processed += 1
                res = p.push(f, meta=t_in)
                if res is None:
                    self.stats.withheld_warmup += 1
                    continue
                last = res.x
                self._out(Delivered(res.x, res.frame_index, res.meta, 0.0, False, res.strength))
            if self.flush:
                for res in p.flush():
                    last = res.x
                    self._out(Delivered(res.x, res.frame_index, res.meta, 0.0, False, res.strength))
        except Exception as e:
            self.stats.errors.append(f"generator: {e!r}")
        finally:
            self.out_q.close()

    def _out(self, d: Delivered) -> None:
        self.out_q.put(d, block=self.offline)

    def _consume(self) -> None:
        while True:
            try:
                d = self.out_q.get()
            except QueueClosed:
                break
            d.delivered_at = time.perf_counter()
            self.stats.delivered += 1
            self.stats.latencies.append(d.latency)
            if self.sink is not None:
                try:
                    self.sink(d)
                except Exception as e:  # pragma: no cover - reported in stats
                    self.stats.errors.append(f"consumer: {e!r}")

    def run(self, timeout: Optional[float] = None) -> RunStats:
        calls0, rows0 = self.pipeline.calls, self.pipeline.rows
        threads = [threading.Thread(target=fn, name=f"stream-{name}", daemon=True)
                   for name, fn in (("producer", self._produce), ("generator", self._generate), ("consumer", self._consume))]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout)
        self.stats.seconds = time.perf_counter() - t0
        self.stats.dropped_in = self.in_q.dropped
        self.stats.dropped_out = self.out_q.dropped
        self.stats.calls = self.pipeline.calls - calls0
        self.stats.rows = self.pipeline.rows - rows0
        self.stats.queue_high_water = {"in": self.in_q.high_water, "out": self.out_q.high_water}
        if any(th.is_alive() for th in threads):
            self.stats.errors.append("timed out")
            self.in_q.close()
            self.out_q.close()
        return self.stats
