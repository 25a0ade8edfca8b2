"""Learned / calibrated solvers vs the peers on held-out noise, per field and NFE.

For each field (bench/solvers.py's fields: oracle2d, oracle64d, checkerboard MLP, digits UNet;
the trained ones from research/train_fields.py) and NFE 3..10:
  * best peer: every peer of ``bench.solvers.make_peers()`` at exactly that NFE,
  * best uncalibrated straightflow: every registered deterministic fixed-step solver on the
    uniform grid at exactly that NFE (chosen on the held-out batch, as the benchmark does),
  * calibrated kinds (fit_solvers.calibrate): learned ``ls`` (no backprop), learned ``grad``
    (exact gradients), ``ls+grad``, and ``dc`` (DC-Solver ratios on the best classical start),
all measured on the held-out batch (the benchmark's evaluation noise, seed 0) against a float64
dopri5 reference at rtol = atol = 1e-8; calibration noise is a separate batch (seed 1000).
CPU seconds are time.process_time() of one thread; model calls are batch evaluations.

Run: cd research && PYTHONPATH=../src:. python learned_bench.py --fields oracle2d,oracle64d,checkerboard,digits
     (then python learned_bench.py --report to write RESULTS tables from out/*.json)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)

from straightflow.bench.solvers import _make_field, make_peers, Counter  # noqa: E402
from straightflow.optimize.learned import fit_learned as calibrate, reference  # noqa: E402
from straightflow.time import shift_time  # noqa: E402
from straightflow.solvers import available, get_solver, sample  # noqa: E402
from straightflow.solvers.learned import LearnedSolver, _is_fixed_deterministic, sample_learned  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
CALIB_N = {"oracle2d": 512, "oracle64d": 512, "oracle64d-2048": 512, "checkerboard": 512, "digits": 128,
           "digits-cfg": 128}
NFES = tuple(range(3, 11))


def rmse(a, b):
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def noise(shape, seed, dtype):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@torch.no_grad()
def peers_table(fld, ref, nfes):
    peers, info, skipped = make_peers()
    rows = {}
    for p in peers:
        for nfe in nfes:
            steps = p.steps_for(nfe)
            if steps is None:
                continue
            c = Counter(fld.model, fld.cond)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    y = p.run(c, fld.noise.clone(), steps)
                except Exception as e:  # a peer that fails is reported, not fatal
                    rows.setdefault(p.name, {})[nfe] = f"error: {e}"
                    continue
            if c.n == nfe:
                rows.setdefault(p.name, {})[nfe] = rmse(y, ref)
    return rows, {k: v.get("version", "?") for k, v in info.items()}


@torch.no_grad()
def ours_table(fld, ref, nfes):
    rows = {}
    for name in available():
        spec = get_solver(name)
        if not _is_fixed_deterministic(spec):
            continue
        for nfe in nfes:
            steps = spec.steps_for_nfe(nfe)
            for s in (steps, steps - 1, steps + 1):
                if s < 1:
                    continue
                try:
                    ls = LearnedSolver.from_solver(name, s)
                except Exception:
                    break
                if ls.nfe == nfe:
                    r = sample(fld.model, fld.noise, solver=name, steps=s, cond=fld.cond)
                    rows.setdefault(spec.name, {})[nfe] = rmse(r.x, ref)
                    break
    return rows


GUIDANCE = 2.0


def _cfg_field():
    """Class-conditional digits UNet (research/train_cfg_digits.py) under classifier-free guidance 2:
    the field every method samples is the guided velocity, labels cycling through the classes."""
    import copy

    from straightflow import checkpoint
    from straightflow.bench.solvers import Field
    from straightflow.solvers import ClassifierFreeGuidance

    run = OUT / "runs" / "digits-cond"
    raw = checkpoint.load(run).eval()
    for p in raw.parameters():
        p.requires_grad_(False)
    raw64 = copy.deepcopy(raw).double()
    shape = tuple(raw.sample_shape)
    x = noise((128, *shape), 0, torch.float32)
    fld = Field("digits-cfg", "class-conditional digits 8x8 UNet, CFG scale 2 (float32)",
                ClassifierFreeGuidance(raw, GUIDANCE), torch.float32, x, x, model64=ClassifierFreeGuidance(raw64, GUIDANCE),
                cond={"y": torch.arange(128) % raw.num_classes}, source=f"trained `{run}` (bench digits settings, conditional)")
    return fld, raw, raw64


def run_field(name, nfes, modes, grad_iters, calib_n=None):
    path = OUT / (f"{name}-c{calib_n}.json" if calib_n else f"{name}.json")
    out = json.loads(path.read_text()) if path.is_file() else {}
    guidance = None
    if name == "digits-cfg":
        fld, raw, raw64 = _cfg_field()
        guidance = GUIDANCE
    else:
        base, _, n_eval = name.partition("-")  # "oracle64d-2048": the same field, a larger held-out batch
        fld = _make_field(base, OUT, None, False, 0, int(n_eval) if n_eval else None, False)
        raw, raw64 = fld.model, fld.model64
    calib = noise((calib_n or CALIB_N[name], *fld.noise.shape[1:]), 1000, fld.dtype)
    ccond = None
    if fld.cond:
        nc = int(fld.cond["y"].max()) + 1
        ccond = {"y": torch.arange(calib.shape[0]) % nc}
    t0 = time.process_time()
    rh = reference(fld.model64, fld.noise, cond=fld.cond)
    ref_h_cpu = time.process_time() - t0
    t0 = time.process_time()
    rc = reference(fld.model64, calib, cond=ccond)
    ref_c_cpu = time.process_time() - t0
    # every time a calibration below may ask for (uniform grids of 1-11 steps, their SD3-shift warps
    # 0.7 / 1.4 used by the least-squares fits, and the midpoints used by the EMS statistics), in one solve
    t0 = time.process_time()
    need = set()
    for s_ in range(1, 12):
        g = torch.linspace(0, 1, s_ + 1, dtype=torch.float64)
        need |= set(g.tolist()) | set(shift_time(g, 0.7).tolist()) | set(shift_time(g, 1.4).tolist())
        need |= {0.5 * (a + b) for a, b in zip(g.tolist(), g.tolist()[1:])}
    rc.extend(raw64 if guidance is None else fld.model64, sorted(need), cond=ccond)
    ref_c_cpu += time.process_time() - t0
    ref = rh.at(1.0)
    out.update({"field": name, "title": fld.title, "source": fld.source, "n_heldout": int(fld.noise.shape[0]),
                "n_calib": int(calib.shape[0]), "reference": {"heldout_calls": rh.calls, "heldout_cpu": ref_h_cpu,
                                                              "calib_calls": rc.calls, "calib_cpu": ref_c_cpu}})
    if "peers" not in out:
        out["peers"], out["peer_versions"] = peers_table(fld, ref, nfes)
        out["ours"] = ours_table(fld, ref, nfes)
    out.setdefault("calibrated", {})
    for nfe in nfes:
        for mode in modes:
            if str(nfe) in out["calibrated"].get(mode, {}):
                continue
            r = calibrate(raw, calib, fld.noise, nfe, mode=mode, cond=ccond, heldout_cond=fld.cond,
                          guidance=guidance, model64=raw64, references=(rc, rh), grad_iters=grad_iters)
            check = rmse(sample_learned(raw, fld.noise, r.solver, cond=fld.cond).x, ref)
            rec = r.to_dict()
            rec["heldout_chosen"] = check
            out["calibrated"].setdefault(mode, {})[str(nfe)] = rec
            print(f"{name} NFE {nfe} {mode}: init {r.initial.meta.get('init')} held {r.heldout_rmse['init']:.3e} -> "
                  f"{r.heldout_rmse['fitted']:.3e} (chosen {check:.3e}, fallback {r.fallback}) cpu {r.cpu_seconds:.1f}s "
                  f"calls {r.model_calls}", flush=True)
    out["reference"]["calib_calls_total"] = rc.calls
    path.write_text(json.dumps(out, indent=1, default=str))
    return out


def _best(d, nfe):
    c = [(v[nfe], k) for k, v in d.items() if isinstance(v.get(nfe), float) and math.isfinite(v[nfe])]
    return min(c) if c else (math.nan, "-")


def report(fields, modes):
    L = []
    for name in fields:
        p = OUT / f"{name}.json"
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        conv = lambda m: {k: {int(n): v for n, v in vv.items()} for k, vv in m.items()}  # noqa: E731
        peers, ours = conv(d["peers"]), conv(d["ours"])
        cal = {m: {int(n): v for n, v in d["calibrated"].get(m, {}).items()} for m in modes}
        ref = d["reference"]
        L += [f"### {name}: {d['title']}", "",
              f"Held-out n = {d['n_heldout']} (seed 0), calibration n = {d['n_calib']} (seed 1000). Reference: "
              f"float64 dopri5 rtol = atol = 1e-8: held-out {ref['heldout_calls']} calls; calibration batch "
              f"(endpoint and the states at every time a fit below uses, NFE 3-10) {ref['calib_calls']} calls, "
              f"{ref['calib_cpu']:.1f} CPU s ({ref['calib_calls_total']} calls in all, with the times the DC fits added).", "",
              "| NFE | best peer | RMSE | best straightflow, uncalibrated | RMSE | ratio | "
              + " | ".join(f"{m} RMSE (ratio)" for m in modes) + " | best calibrated / peer | CPU s (" + "/".join(modes) + ") | model calls (" + "/".join(modes) + ") |",
              "|---:|---|---:|---|---:|---:|" + "---:|" * len(modes) + "---:|---|---|"]
        for nfe in sorted({n for v in peers.values() for n in v}):
            bp, bpn = _best(peers, nfe)
            bo, bon = _best(ours, nfe)
            cells, cpu, calls, bestc = [], [], [], math.inf
            for m in modes:
                rec = cal[m].get(nfe)
                if rec is None:
                    cells.append("-"); cpu.append("-"); calls.append("-")
                    continue
                v = rec["heldout_chosen"]
                bestc = min(bestc, v)
                fb = " fb" if rec["fallback"] else ""
                cells.append(f"{v:.2e} ({v / bp:.2f}){fb}")
                cpu.append(f"{rec['cpu_seconds']:.1f}")
                calls.append(str(sum(rec["model_calls"].values())))
            L.append(f"| {nfe} | {bpn} | {bp:.2e} | {bon} | {bo:.2e} | {bo / bp:.2f} | " + " | ".join(cells)
                     + f" | **{bestc / bp:.2f}** | {'/'.join(cpu)} | {'/'.join(calls)} |")
        L.append("")
    return "\n".join(L)


def summary(fields, modes, pick="auto"):
    """field x NFE: uncalibrated / best peer, ``pick`` mode / best peer, best calibrated kind / best peer."""
    nfes = list(NFES)
    L = ["| field | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for name in fields:
        p = OUT / f"{name}.json"
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        conv = lambda m: {k: {int(n): v for n, v in vv.items()} for k, vv in m.items()}  # noqa: E731
        peers, ours = conv(d["peers"]), conv(d["ours"])
        cal = {m: {int(n): v for n, v in d["calibrated"].get(m, {}).items()} for m in modes}
        cells = []
        for n in nfes:
            bp, _ = _best(peers, n)
            bo, _ = _best(ours, n)
            best = min([(cal[m][n]["heldout_chosen"], m) for m in modes if n in cal[m]], default=(math.nan, "-"))
            auto = cal.get(pick, {}).get(n)
            a = f"{auto['heldout_chosen'] / bp:.2f}" if auto else "-"
            cells.append(f"{bo / bp:.2f} / {a} / {best[0] / bp:.2f} ({best[1]})")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def defaults(fields, top=8):
    """Uncalibrated straightflow solvers (uniform grid) by their worst RMSE / best-peer ratio over
    the fields and NFE 4-10 they reach (a candidate for the uncalibrated default)."""
    worst, seen = {}, {}
    for name in fields:
        p = OUT / f"{name}.json"
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        peers = {k: {int(n): v for n, v in vv.items()} for k, vv in d["peers"].items()}
        for solver, row in d["ours"].items():
            for n, v in row.items():
                n = int(n)
                if 4 <= n <= 10 and isinstance(v, float):
                    r = v / _best(peers, n)[0]
                    worst[solver] = max(worst.get(solver, 0.0), r)
                    seen.setdefault(solver, set()).add((name, n))
    full = max((len(v) for v in seen.values()), default=0)
    rows = sorted((w, s) for s, w in worst.items() if len(seen[s]) == full)[:top]
    return "\n".join(["| solver (uniform grid) | worst RMSE / best peer, NFE 4-10, all fields |", "|---|---:|"]
                     + [f"| {s} | {w:.2f} |" for w, s in rows])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fields", default="oracle2d,oracle64d,checkerboard,digits")
    ap.add_argument("--nfes", default=",".join(map(str, NFES)))
    ap.add_argument("--modes", default="ls,grad,ls+grad,dc")
    ap.add_argument("--grad-iters", type=int, default=120)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--calib-n", type=int, default=None, help="calibration batch (default: per field); "
                    "results go to out/<field>-c<N>.json, reported as field <field>-c<N>")
    a = ap.parse_args(argv)
    fields = [f for f in a.fields.split(",") if f]
    modes = [m for m in a.modes.split(",") if m]
    if a.report:
        print(summary(fields, modes))
        print()
        print(defaults(fields))
        print()
        print(report(fields, modes))
        return 0
    for f in fields:
        t0 = time.time()
        run_field(f, [int(v) for v in a.nfes.split(",")], modes, a.grad_iters, a.calib_n)
        print(f"{f} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
