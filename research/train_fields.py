"""Train (or reuse) the benchmark's checkerboard MLP and digits UNet into research/out/runs, exactly
as `straightflow bench solvers` does (bench/solvers.py `_make_field`).
Run: PYTHONPATH=src python research/train_fields.py"""
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from straightflow.bench.solvers import _make_field  # noqa: E402

out = Path(__file__).resolve().parent / "out"
for name in sys.argv[1:] or ["checkerboard", "digits"]:
    t0 = time.time()
    fld = _make_field(name, out, None, False, 0, None, True)
    print(name, fld.source, f"{time.time() - t0:.0f} s", flush=True)
