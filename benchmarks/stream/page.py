"""The page section: the served page in headless Chromium (Playwright), output fps and round trips."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List

import numpy as np

from .load import free_port, http_json


def page_fps(model, send_rates: List[int], seconds: float, chromium: str, settle: float = 2.0) -> Dict[str, Any]:
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
    port = free_port()
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
                before = http_json(f"http://127.0.0.1:{port}/stats")
                n0, t1 = page.evaluate("window.sfReceived"), time.perf_counter()
                page.wait_for_timeout(int(1000 * seconds))
                fps = (page.evaluate("window.sfReceived") - n0) / (time.perf_counter() - t1)
                after = http_json(f"http://127.0.0.1:{port}/stats")
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


