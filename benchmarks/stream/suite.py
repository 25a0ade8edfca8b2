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
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from straightflow import checkpoint
from straightflow.stream import resolve_run
from straightflow.stream.clips import builtin_clip, static_mask
from straightflow.stream.filter import cosine_similarity
from straightflow.stream.pipeline import MotionStrength

from ..harness import Report, Timing, register_suite, run_suite
from .cost import cost_markdown, cost_section, large_model, plot_cost
from .load import run_load_test
from .page import page_fps
from .report import fmt_value, plot_stream, ratio_table
from .settings import COST_ROWS, LARGE_SPEC, LARGE_SPEC_QUICK, SECTIONS
from .throughput import bench_configs

__all__ = ["main", "SECTIONS", "LARGE_SPEC"]


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
            throughput += bench_configs(model, clip, sb_cfgs, repeats, th)
        if "rcfg" in sec:
            print(f"[bench stream] {th} thread(s): RCFG vs full CFG", flush=True)
            rcfg_rows += bench_configs(model, clip, rc_cfgs, repeats, th)
    torch.set_num_threads(thread_list[0])
    if "filter" in sec:
        print("[bench stream] similarity filter", flush=True)
        filter_rows = bench_configs(model, clip, f_cfgs, repeats, thread_list[0])
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
            cost.append(cost_section("small", model, clip, label, cost_ns, cost_rows, repeats, cost_reps,
                                      a.strength, a.guidance))
        if a.rcfg_model in ("large", "both"):
            big = large_model(large_spec)
            bc, bh, _ = big.sample_shape
            lf = a.large_frames or (4 if quick else 32)
            big_clip = builtin_clip(lf, bh, bc, move=move, hold=hold)
            big_label = a.label % int(big.num_classes)
            cost.append(cost_section("large", big, big_clip, big_label, cost_ns, cost_rows, repeats,
                                      2 if quick else 9, a.strength, a.guidance))
        torch.set_num_threads(thread_list[0])

    load: Dict[str, Any] = {}
    load_hi: Dict[str, Any] = {}
    if "load" in sec and not a.no_load_test:
        print(f"[bench stream] load test: {a.clients} clients x {load_frames} frames (default rate limit)", flush=True)
        load = run_load_test(run, a.clients, load_frames, a.threads, None, quick, (c, h, w), n_hostile)
        if not quick:
            print("[bench stream] load test: rate limit lifted (queues alone bound the load)", flush=True)
            load_hi = run_load_test(run, a.clients, load_frames, a.threads, 1e6, quick, (c, h, w), n_hostile)

    page: Dict[str, Any] = {}
    if "page" in sec:
        rates = [int(v) for v in a.page_send_fps.split(",") if v.strip()]
        rates = rates[-1:] if quick else rates  # quick: the last (highest) send rate only
        secs = a.page_seconds or (2.0 if quick else 20.0)
        print(f"[bench stream] page: headless Chromium at send rates {rates}, {secs:g} s each", flush=True)
        page = page_fps(model, rates, secs, a.chromium, settle=0.5 if quick else 2.0)

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
               ratio_table(throughput, lambda r: seq_of(r, throughput), "sequential"), ""]
    if rcfg_rows:
        md += ["## RCFG variants vs full CFG (Stream Batch unless marked sequential)", "",
               ratio_table(rcfg_rows, lambda r: full_of(r, rcfg_rows), "full CFG"), ""]
    if cost:
        large = next((R for R in cost if R["model"] == "large"), None)
        md += cost_markdown(cost, cost_rows, repeats, a.guidance)
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
               ratio_table(filter_rows, lambda r: filter_rows[0], "no filter"), "",
               f"Mean cosine similarity of consecutive frames: moving {sim_moving:.4f}, static 1.0 "
               f"({int(mask.sum())} of {n_frames} frames are static repeats). A skipped frame re-emits the last output "
               "and costs no model call; fps counts every emitted frame.", ""]
    if motion:
        md += ["## Motion-aware strength (StreamDiffusionV2)", "",
               f"strength = 0.7 - 0.4 * EMA_0.5(clip(mean|x_k - x_(k-1)| / 0.05, 0, 1)): mean strength "
               f"{motion['mean_strength_moving']:.3f} on moving frames, "
               f"{fmt_value(motion['mean_strength_static'], 3)} on static ones (see stream.png, right).", ""]
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
               f"{s['processed']} | {L['received']} | {fmt_value(L['delivered_latency_ms_p50'])} / {fmt_value(L['delivered_latency_ms_p99'])} | "
               f"{fmt_value(s['latency_ms_p50'])} / {fmt_value(s['latency_ms_p99'])} | {L['rss_mb_start']:.0f} / {L['rss_mb_max']:.0f} / "
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
               f"{fmt_value(r['server_latency_ms_p50'])} / {fmt_value(r['server_latency_ms_p99'])} | "
               f"{fmt_value(r['corr'], 2)} ({fmt_value(r['corr_stale'], 2)}) |" for r in page["rows"]]
        md += [""]
    md += [f"Total bench time: {time.time() - t_start:.0f} s.", ""]
    if throughput or motion:
        md += ["![stream](stream.png)", ""]
        plot_stream(throughput, motion, out / "stream.png")
    if cost:
        plot_cost(cost, out / "rcfg_cost.png")
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

