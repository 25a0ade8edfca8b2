"""Stream a clip offline through Stream Batch: producer -> pipeline -> consumer threads, every output
frame written as a PNG, with a latency report (``straightflow stream``).
"""
from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from PIL import Image

from ..io import save_json
from ..system import machine_line
from .clips import frames_to_uint8
from .filter import SimilarityFilter
from .pipeline import MotionStrength, StreamBatchPipeline
from .queues import StreamRunner

__all__ = ["run_stream"]


def run_stream(model, clip: torch.Tensor, out: str, *, n_steps: int = 2, strength: float = 0.5, rcfg: str = "self",
               guidance: float = 1.5, delta: float = 1.0, label: Optional[int] = 0, filter_threshold: Optional[float] = None,
               max_skip: int = 10, motion: Optional[List[float]] = None, fps: float = 0.0, seed: int = 0,
               scale: int = 8, command: str = "") -> Dict[str, Any]:
    """Run ``clip`` through producer -> Stream Batch -> consumer threads; write PNGs and a latency report."""
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
    md = ["# straightflow stream report", "", f"Command: `{command}`" if command else "", f"Date {date.today().isoformat()}; {machine_line()}", "",
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
