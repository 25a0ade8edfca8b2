"""Train a class-conditional digits UNet (the benchmark's digits settings, conditional=True,
label dropout 0.1 for classifier-free guidance) into research/out/runs/digits-cond.
Run: PYTHONPATH=src python research/train_cfg_digits.py"""
import json
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from straightflow.bench.solvers import _train_settings  # noqa: E402
from straightflow.cli import train_run  # noqa: E402

run = Path(__file__).resolve().parent / "out" / "runs" / "digits-cond"
st = {**_train_settings("digits", False), "conditional": True}
if not (run / "model.safetensors").is_file():
    t0 = time.time()
    kw = {k: v for k, v in st.items() if k not in ("data", "steps")}
    res = train_run(st["data"], str(run), st["steps"], seed=0, ckpt_every=10**9, progress=False, **kw)
    (run / "bench-trained.json").write_text(json.dumps({**st, "seed": 0}))
    print(f"trained {run} in {time.time() - t0:.0f} s, final loss {res.final_loss:.3f}")
