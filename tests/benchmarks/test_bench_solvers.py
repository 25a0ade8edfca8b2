"""The solver benchmark (quick mode, one oracle field): files, tables, counted NFE, peer convergence.

No timing is asserted; the run itself takes well under a minute on one thread.
"""
import importlib.util
import json
import math
import warnings

import pytest
import torch

from benchmarks import solvers as bs
from straightflow.solvers import CountedVelocity, available, get_solver, sample

QUICK_NFES = list(bs.QUICK_NFES)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_solvers")
    md = bs.bench_solvers(out, quick=True, fields=("oracle2d",), progress=False)
    return out, md, json.loads((out / "solvers.json").read_text())


def _table(md: str, first_header: str):
    """Rows of the first Markdown table whose header starts with ``| first_header |``."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for l in lines[start + 2:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip("|").split("|")])
    return header, rows


def _fixed_solvers():
    out = []
    for name in available():
        spec = get_solver(name)
        if not spec.stochastic and not spec.adaptive:
            out.append(spec.name)
    return out


def test_files_exist(bench):
    out, md, data = bench
    for f in ("solvers.md", "solvers.json", "solvers-oracle2d.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "solvers.md").read_text() == md
    assert data["meta"]["quick"] and data["meta"]["nfes"] == QUICK_NFES
    assert "dopri5" in data["fields"]["oracle2d"]["reference"] or "rk4" in data["fields"]["oracle2d"]["reference"]
    for word in ("Machine:", "Date:", "Command:", "Reference:"):
        assert word in md


def test_field_table_rows_and_columns(bench):
    _, md, data = bench
    header, rows = _table(md, "method")
    assert header == ["method", "library"] + [str(k) for k in QUICK_NFES]
    assert all(len(r) == len(header) for r in rows)
    names = [r[0] for r in rows]
    assert len(names) == len(set(names))
    for s in _fixed_solvers():  # every deterministic fixed-step solver of the registry, on two grids
        assert f"{s} / uniform" in names, s
        assert f"{s} / BOSS" in names, s
    assert "searched schedule" in names
    for r in rows:  # every cell is a number or '-'
        for c in r[2:]:
            assert c == "-" or math.isfinite(float(c.split()[0])), c
    # the summary covers NFE 4-10 of the quick list
    sh, srows = _table(md, "field")
    assert sh[:2] == ["field", "NFE"] and "ratio" in sh
    assert [int(r[1]) for r in srows] == [k for k in QUICK_NFES if 4 <= k <= 10]


def test_every_reported_nfe_is_the_counted_one(bench):
    _, md, data = bench
    res = data["fields"]["oracle2d"]["results"]
    assert res
    for r in res:
        if r["kind"] == "search":
            assert 1 <= r["nfe"] <= r["nfe_target"]
        else:
            assert r["nfe"] == r["nfe_target"], r
    # every value in the Markdown table is one of these counted results, in its own column
    header, rows = _table(md, "method")
    by = {(r["method"], r["nfe_target"]): r for r in res}
    for row in rows:
        for col, cell in zip(header[2:], row[2:]):
            if cell == "-":
                assert (row[0], int(col)) not in by
                continue
            r = by[(row[0], int(col))]
            assert float(cell.split()[0]) == pytest.approx(r["rmse"], rel=1e-2)
            if "(" in cell:
                assert int(cell.split("(")[1].rstrip(")")) == r["nfe"]
    # recount independently: a straightflow solver and every peer at one NFE, with our own counter
    x = torch.randn(8, 2, dtype=torch.float64)
    calls = {"n": 0}

    def v(x, t):
        calls["n"] += 1
        return -x

    for name in ("heun", "euler"):
        steps = bs.sf_steps_for_nfe(name, 4)
        calls["n"] = 0
        sample(v, x, solver=name, steps=steps)
        assert calls["n"] == 4 == by[(f"{name} / uniform", 4)]["nfe"]
    peers, _, _ = bs.make_peers()
    for p in peers:
        for nfe in QUICK_NFES:
            if (p.name, nfe) not in by:
                continue
            c = CountedVelocity(lambda x, t: -x, check_finite=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p.run(c, x.clone(), by[(p.name, nfe)]["steps"])
            assert c.calls == by[(p.name, nfe)]["nfe"] == nfe, (p.name, nfe)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_diffusers_peers_converge_on_the_oracle(bench):
    _, _, data = bench
    fo = data["fields"]["oracle2d"]
    res = [r for r in fo["results"] if r["library"] == "diffusers"]
    names = {r["method"] for r in res}
    assert {"diffusers FlowMatchEuler", "diffusers FlowMatchHeun", "diffusers DPM++2M", "diffusers UniPC"} <= names
    for name in names:
        errs = {r["nfe_target"]: r["rmse"] for r in res if r["method"] == name}
        lo = min(k for k in errs if k >= 4)  # FlowMatchHeun reaches odd NFE only (2N - 1)
        hi = max(errs)
        assert hi >= 15 and errs[hi] < errs[lo], (name, errs)
        if 20 in errs and 4 in errs:
            assert errs[20] < errs[4]
    # and with many steps, on the sigma grid used in the tables, they keep converging
    assert any(row["used"] for row in fo["diffusers_check"])
    for row in fo["diffusers_check"]:
        if row["used"]:
            e = {int(k): v for k, v in row["rmse"].items()}
            ks = sorted(e)
            assert all(e[b] < e[a] for a, b in zip(ks, ks[1:])), row


def test_calibrated_rows_sections_and_counted_nfe(bench):
    """Issue 13: each calibration kind at the quick NFE, on the evaluation batch, with counted NFE,
    its cost, the transfer rows, and the summary of ratios to the best peer."""
    from benchmarks.solvers import calibrated as sc

    _, md, data = bench
    fo = data["fields"]["oracle2d"]
    want = [k for k in QUICK_NFES if k in sc.QUICK_CAL_NFES]
    cal_rows = [r for r in fo["results"] if r["kind"] == "calibrated"]
    assert {(r["calibration_kind"], r["nfe_target"]) for r in cal_rows} == {(k, n) for k in sc.CAL_KINDS for n in want}
    for r in cal_rows:
        assert r["nfe"] == r["nfe_counted"] == r["nfe_target"], r
        assert math.isfinite(r["rmse"]) and r["initial_solver"]
    # three disjoint batches: calibration, calibrate's held-out, evaluation
    rec = fo["calibration_kinds"]
    assert len({rec["calib_seed"], rec["holdout_seed"], data["meta"].get("seed", 0)}) == 3
    assert rec["reference"]["calls"] > 0
    assert {(c["kind"], c["nfe"]) for c in rec["costs"]} == {(k, n) for k in sc.CAL_KINDS for n in want}
    assert all(c["cpu_seconds"] > 0 and c["model_calls"] > 0 for c in rec["costs"])
    # the method table carries the calibrated rows like any other method
    _, rows = _table(md, "method")
    assert {f"{k} (calibrated, auto)" for k in sc.CAL_KINDS} <= {r[0] for r in rows}
    header, rows = _table(md, "kind")
    assert header[:3] == ["kind", "NFE", "eval RMSE"] and "CPU s" in header and "model calls" in header
    assert len(rows) == len(cal_rows)
    # transfer: another evaluation batch and another calibration batch
    tr = fo["transfer"]
    assert tr["batch"] and tr["refit"] and not tr["guidance"]  # oracle2d is not guided
    assert tr["batch"][0]["seed"] != 0 and tr["refit"][0]["calib_seed"] != rec["calib_seed"]
    # the summary: field x NFE with the targets
    assert "## Summary: calibrated and uncalibrated straightflow / best peer" in md
    header, rows = _table(md, "field x NFE")
    assert header[1:] == [str(k) for k in QUICK_NFES if 3 <= k <= 10]
    assert rows[0][0] == "oracle2d"
    cs = {(r["field"], r["nfe"]): r for r in data["calibrated_summary"]["rows"]}
    for n in want:
        r = cs[("oracle2d", n)]
        best = min(q["rmse"] for q in cal_rows if q["nfe_target"] == n)
        assert r["cal_ratio"] == pytest.approx(best / r["peer"]["rmse"])
    assert "Calibrated target (<= 0.33 at NFE 4-10)" in md
