"""``straightflow bench nf --quick``: the report's structure (never its timings)."""
from __future__ import annotations

import json

from benchmarks.nf import main


def test_bench_nf_quick_structure(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "nf.md").read_text()
    for part in ("# Benchmark: normalizing flows", "Command: `straightflow bench nf --quick", "Machine:",
                 "## Likelihood (held-out bits/dim", "TarFlow (straightflow, 4 blocks)", "## Sampling: GS-Jacobi",
                 "sequential (reference)", "CRM/IGM plan", "FD (digits classifier"):
        assert part in md, part
    data = json.loads((tmp_path / "nf.json").read_text())
    rows = data["sampling"]["rows"]
    assert rows[0]["setting"].startswith("sequential") and rows[0]["max_diff"] == 0.0
    exact = [r for r in rows if r["setting"].startswith("tol 0,")]
    assert exact and all(r["max_diff"] < 1e-4 for r in exact)
    assert all(r["bpd"] > 0 for r in data["likelihood"]["rows"])
