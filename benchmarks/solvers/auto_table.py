"""Measure which fixed (uncalibrated) solver is best at each exact NFE: the table behind ``solver="auto"``.

``python -m benchmarks.solvers.auto_table --out docs/bench/auto`` draws random Gaussian-mixture oracle
fields (8 components; two families, see :func:`make_fields`) in 2, 16 and 64 dimensions, integrates one
noise batch per field with a float64 dopri5 reference (rtol = atol = 1e-10), and runs every registered
deterministic fixed-step solver at every exact NFE k (``steps = spec.steps_for_nfe(k)``; a solver whose
exact cost cannot equal k is skipped at that k). Per field and NFE, each solver's endpoint RMSE is divided
by the best RMSE any solver reached there; per NFE the chosen solver is the one with the lowest median
ratio over fields (ties: lower worst ratio, then name).

Writes ``OUT/auto_table.md`` and ``.json``; ``--docs`` also writes the documentation page
(``docs/solvers-auto.md``) and ``--module`` the table module (``src/straightflow/solvers/auto.py``), so
what the library uses is exactly what was measured. Field seeds default to 1001-1003 per family and
dimension: the tests evaluate on other seeds.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import available, get_solver, initial_noise, sample
from straightflow.system import machine_line

from ..harness import Report, Timing, table, write_report

DIMS = (2, 16, 64)
SEEDS = (1001, 1002, 1003)
NFES = tuple(range(2, 13))
REF_RTOL = 1e-10
FAMILIES = ("spread", "sharp")


def make_fields(dim: int, seed: int) -> List[Tuple[str, GaussianMixtureFlow]]:
    """Two 8-component mixtures for one (dim, seed):

    - ``spread``: ``GaussianMixtureFlow.random(dim, 8, seed)`` (means in a ball of radius 2.5, anisotropic
      full covariances, stds up to 0.5);
    - ``sharp``: the means of ``random(dim, 8, seed, scale=3.0)`` (spread 3) with isotropic component
      stds log-uniform in [0.05, 0.5] and weights in [0.5, 1.5]: thin modes whose trajectories split late.
    """
    spread = GaussianMixtureFlow.random(dim=dim, n_components=8, seed=seed)
    g = torch.Generator().manual_seed(10_000 + int(seed))
    stds = 0.05 * 10.0 ** torch.rand(8, generator=g, dtype=torch.float64)  # log-uniform in [0.05, 0.5]
    weights = 0.5 + torch.rand(8, generator=g, dtype=torch.float64)
    means = GaussianMixtureFlow.random(dim=dim, n_components=8, seed=seed, scale=3.0).means
    sharp = GaussianMixtureFlow(means, stds=stds, weights=weights)
    return [(f"spread d{dim} s{seed}", spread), (f"sharp d{dim} s{seed}", sharp)]


def candidates() -> List[str]:
    """Every registered deterministic fixed-step solver."""
    return [n for n in available() if not get_solver(n).stochastic and not get_solver(n).adaptive]


def exact_steps(name: str, nfe: int) -> Optional[int]:
    """Steps at which ``name`` spends exactly ``nfe`` evaluations on [0, 1], or None."""
    spec = get_solver(name)
    s = spec.steps_for_nfe(nfe)
    return s if spec.nfe(s) == nfe else None


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def measure(dims: Sequence[int], seeds: Sequence[int], nfes: Sequence[int], n: int, log) -> Dict:
    """``{"fields": [...], "rmse": {field: {solver: {nfe: rmse}}}}`` over every field, solver and NFE."""
    names = candidates()
    out: Dict = {"fields": [], "rmse": {}, "ref_nfe": {}}
    for dim in dims:
        for seed in seeds:
            for fname, fld in make_fields(dim, seed):
                t0 = time.process_time()
                x, _ = initial_noise((n, dim), seed=seed, dtype=torch.float64)
                ref = sample(fld, x, solver="dopri5", steps=1, rtol=REF_RTOL, atol=REF_RTOL)
                row: Dict[str, Dict[int, float]] = {}
                for s in names:
                    for k in nfes:
                        steps = exact_steps(s, k)
                        if steps is None:
                            continue
                        res = sample(fld, x, solver=s, steps=steps)
                        assert res.nfe == k, (s, k, res.nfe)
                        row.setdefault(s, {})[k] = rmse(res.x, ref.x)
                out["fields"].append(fname)
                out["rmse"][fname] = row
                out["ref_nfe"][fname] = ref.nfe
                log(f"{fname}: reference NFE {ref.nfe}, {time.process_time() - t0:.1f} CPU s")
    return out


def choose(data: Dict, nfes: Sequence[int]) -> Dict[int, Dict]:
    """Per NFE: every solver's median and worst ratio to the per-field best, and the chosen solver."""
    res: Dict[int, Dict] = {}
    for k in nfes:
        ratios: Dict[str, List[float]] = {}
        for f in data["fields"]:
            row = {s: v[k] for s, v in data["rmse"][f].items() if k in v}
            best = min(row.values())
            for s, v in row.items():
                ratios.setdefault(s, []).append(v / best if best > 0 else 1.0)
        stats = {s: (statistics.median(r), max(r)) for s, r in ratios.items() if len(r) == len(data["fields"])}
        order = sorted(stats, key=lambda s: (stats[s][0], stats[s][1], s))
        res[k] = {"choice": order[0], "ranked": [(s, stats[s][0], stats[s][1]) for s in order]}
    return res


def mapping_table(chosen: Dict[int, Dict]) -> str:
    """The Markdown table the tests parse: ``| NFE | solver | steps | median ratio | worst ratio | runner-up |``."""
    rows = []
    for k, c in chosen.items():
        s, med, worst = c["ranked"][0]
        ru = c["ranked"][1] if len(c["ranked"]) > 1 else None
        rows.append([k, f"`{s}`", exact_steps(s, k), f"{med:.2f}", f"{worst:.2f}",
                     f"`{ru[0]}` ({ru[1]:.2f})" if ru else "-"])
    return table(["NFE", "solver", "steps", "median ratio", "worst ratio", "runner-up (median)"], rows, "rllrrl")


def ratio_table(chosen: Dict[int, Dict], nfes: Sequence[int]) -> str:
    """Median ratio to the per-field best, every solver (rows) at every NFE (columns); ``-``: no exact cost."""
    solvers = sorted({s for c in chosen.values() for s, _, _ in c["ranked"]})
    rows = []
    for s in solvers:
        cells = []
        for k in nfes:
            hit = [m for n, m, _ in chosen[k]["ranked"] if n == s]
            cells.append("-" if not hit else (f"**{hit[0]:.2f}**" if chosen[k]["choice"] == s else f"{hit[0]:.2f}"))
        rows.append([f"`{s}`"] + cells)
    return table(["solver"] + [f"NFE {k}" for k in nfes], rows, "l" + "r" * len(nfes))


def module_text(chosen: Dict[int, Dict], command: str, date: str, machine: str, n_fields: int) -> str:
    entries = "\n".join(f"    {k}: ({c['choice']!r}, {{}})," for k, c in chosen.items())
    wrapped = " \\\n        ".join(_wrap(command, 100))
    return f'''r"""The fixed solver ``solver="auto"`` uses at each NFE budget: measured, not chosen by hand.

Generated on {date} ({machine}) by::

    {wrapped}

On {n_fields} random Gaussian-mixture oracle fields (8 components, 2, 16 and 64 dimensions, spread and sharp
families, see ``benchmarks/solvers/auto_table.py``), every deterministic fixed-step solver ran at every exact
NFE; per NFE, the solver with the lowest median ratio of its endpoint RMSE (against a float64 dopri5
reference, rtol 1e-10) to the best solver's on the same field. ``docs/solvers-auto.md`` is the table.

:data:`AUTO_TABLE` maps an NFE budget to ``(solver name, solver options)``; :func:`auto_choice` is the lookup
(budgets above the table use its largest entry; below it, an error).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

AUTO_TABLE: Dict[int, Tuple[str, Dict[str, Any]]] = {{
{entries}
}}


def auto_choice(nfe: int) -> Tuple[str, Dict[str, Any]]:
    """``(solver, options)`` for an NFE budget: the measured entry, or the largest entry's above the table."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < min(AUTO_TABLE):
        raise ValueError(f'solver="auto" takes steps = the NFE budget, an integer >= {{min(AUTO_TABLE)}}; '
                         f"got {{nfe!r}}")
    name, options = AUTO_TABLE[min(int(nfe), max(AUTO_TABLE))]
    return name, dict(options)
'''


def _wrap(text: str, width: int) -> List[str]:
    """``text`` split at spaces into lines of at most about ``width`` characters."""
    lines, cur = [], ""
    for w in text.split(" "):
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return lines + ([cur] if cur else [])


def docs_text(chosen: Dict[int, Dict], nfes: Sequence[int], command: str, date: str, machine: str,
              fields: Sequence[str], n: int, threads: int = 1) -> str:
    """The documentation page (``docs/solvers-auto.md``): a harness report with the mapping the tests parse."""
    rep = Report('`solver="auto"`: the best fixed solver at each NFE, measured', command, Timing(threads, repeats=0),
                 date=date, machine=machine)
    rep.add(
        "`sf.sample(model, noise, solver=\"auto\", steps=k)` reads `steps` as the NFE budget `k` and runs the "
        "solver below for that NFE on the uniform grid, at the largest step count whose exact cost is within "
        "`k` (`result.nfe == k` for every `k` in the table). Budgets above 12 use the NFE-12 choice; budgets "
        "below 2 are refused. `straightflow sample RUN --nfe k` uses it when the run has no valid stored "
        "calibration for `k` (a calibration fitted to the model is better still: `straightflow calibrate`).", "",
        f"Fields: {len(fields)} random 8-component Gaussian-mixture oracle fields, {n} noise samples each, in "
        "2, 16 and 64 dimensions: `spread` (`GaussianMixtureFlow.random(dim, 8, seed)`) and `sharp` (means "
        "spread 3, isotropic component scales log-uniform in [0.05, 0.5]); seeds 1001-1003 (the tests evaluate "
        "on others). Score: endpoint RMSE against float64 dopri5 (rtol = atol = 1e-10), divided by the best "
        "solver's RMSE on the same field and NFE; the median over fields decides. The worst ratio (up to ~3) "
        "shows that no fixed solver is best on every field: a calibration fitted to the model is.", "",
        "## The mapping", "", mapping_table(chosen), "",
        "## Median ratio to the per-field best, every solver", "", ratio_table(chosen, nfes), "")
    return rep.render()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.solvers.auto_table", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/bench/auto"), help="folder for auto_table.md/.json")
    p.add_argument("--dims", default=",".join(map(str, DIMS)), help="comma-separated dimensions")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated field seeds")
    p.add_argument("--nfe", default=f"{NFES[0]}-{NFES[-1]}", help="NFE range lo-hi")
    p.add_argument("--n", type=int, default=256, help="noise samples per field")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--docs", type=Path, default=None, help="also write the documentation page here")
    p.add_argument("--module", type=Path, default=None, help="also write the table module here")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dims = [int(v) for v in a.dims.split(",")]
    seeds = [int(v) for v in a.seeds.split(",")]
    lo, _, hi = a.nfe.partition("-")
    nfes = list(range(int(lo), int(hi or lo) + 1))
    if nfes[0] < 2 or a.n < 2:
        p.error("--nfe starts at 2 or more and --n is at least 2")
    command = "python -m benchmarks.solvers.auto_table " + " ".join(shlex.quote(v) for v in (argv if argv is not None else sys.argv[1:]))
    log = (lambda m: None) if a.quiet else (lambda m: print(f"[auto_table] {m}", flush=True))
    t0 = time.process_time()
    data = measure(dims, seeds, nfes, a.n, log)
    chosen = choose(data, nfes)
    date, machine = _dt.date.today().isoformat(), machine_line()
    rep = Report("solver=\"auto\": best fixed solver per NFE", command, Timing(a.threads, repeats=0))
    rep.add("## The mapping", "", mapping_table(chosen), "", "## Median ratio to the per-field best", "",
            ratio_table(chosen, nfes), "", f"{len(data['fields'])} fields; {time.process_time() - t0:.0f} CPU s.")
    rep.write(a.out, "auto_table", {"nfes": nfes, "data": data, "chosen": {str(k): v for k, v in chosen.items()}})
    if a.docs is not None:
        write_report(a.docs.parent, a.docs.stem,
                     docs_text(chosen, nfes, command, date, machine, data["fields"], a.n, a.threads))
    if a.module is not None:
        a.module.parent.mkdir(parents=True, exist_ok=True)
        a.module.write_text(module_text(chosen, command, date, machine, len(data["fields"])))
    print(mapping_table(chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
