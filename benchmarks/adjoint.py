"""Adjoint gradients through sampling, measured: the adjoint (:func:`straightflow.control.odeint_adjoint`)
against backprop through the unrolled solver on the digits UNet (time, peak saved-tensor memory,
gradient agreement), with torchdiffeq's ``odeint_adjoint`` beside it when installed.

A section of ``straightflow bench control``; :class:`SavedTensorMeter` is the memory meter.
"""
from __future__ import annotations

import statistics
import time as _time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from straightflow import io as sfio, plotting
from straightflow.control.adjoint import SoftLabelModel, adjoint_gradients
from straightflow.control.rewards import ClassLogProb
from .scaling import digits_model

__all__ = ["SavedTensorMeter", "bench_adjoint"]


class SavedTensorMeter:
    """Peak bytes of tensors held for backward (autograd saved tensors, deduplicated by storage).

    A ``saved_tensors_hooks`` context: every saved tensor is wrapped in a holder that counts its
    storage once while any holder of it is alive. This is the activation memory that backprop
    through an unrolled solver grows with the steps and the adjoint keeps constant. (tracemalloc
    cannot see it: PyTorch allocates tensor memory outside Python's allocator.)
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._refs: Dict[Tuple[int, int], int] = {}

    class _Holder:
        __slots__ = ("t", "key", "meter", "__weakref__")

        def __init__(self, t: Tensor, meter: "SavedTensorMeter") -> None:
            self.t, self.meter = t, meter
            st = t.untyped_storage()
            self.key = (st.data_ptr(), st.nbytes())
            refs = meter._refs
            if refs.get(self.key, 0) == 0:
                meter.current += self.key[1]
                meter.peak = max(meter.peak, meter.current)
            refs[self.key] = refs.get(self.key, 0) + 1

        def __del__(self) -> None:
            refs = self.meter._refs
            refs[self.key] -= 1
            if refs[self.key] == 0:
                del refs[self.key]
                self.meter.current -= self.key[1]

    def __enter__(self) -> "SavedTensorMeter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: SavedTensorMeter._Holder(t, self),
                                                             lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def _cos_rel(a: List[Tensor], b: List[Tensor]) -> Tuple[float, float]:
    va = torch.cat([t.reshape(-1).double() for t in a])
    vb = torch.cat([t.reshape(-1).double() for t in b])
    cos = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
    rel = float((va - vb).norm() / vb.norm().clamp_min(1e-30))
    return cos, rel


def bench_adjoint(out: str, quick: bool = False, run: Optional[str] = None, repeats: Optional[int] = None) -> str:
    """Adjoint vs backprop through the unrolled solver (Euler, RK4) on the digits UNet: wall time
    (median), peak saved-tensor memory, gradient agreement (cosine, relative error) for the initial
    noise, a continuous class label and the weights; torchdiffeq's ``odeint_adjoint`` (rk4, fixed
    step) beside it when installed. Writes ``adjoint.json`` and ``adjoint_memory.png``; returns Markdown."""

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    model, run_dir = digits_model(out, quick, run)
    model = model.float().train(False)
    for p in model.parameters():
        p.requires_grad_(True)
    soft = SoftLabelModel(model)
    reward = ClassLogProb(3)
    B = 4 if quick else 8
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 1, 8, 8, generator=gen)
    w = soft.one_hot(torch.full((B,), 3)) * 0.7 + 0.3 / (soft.num_classes + 1)
    loss_fn = lambda x: -reward(x)  # noqa: E731
    steps_list = [4, 8] if quick else [5, 10, 20, 40]
    reps = repeats if repeats is not None else (1 if quick else 3)
    rows: List[Dict[str, Any]] = []

    def run_once(method: str, solver: str, steps: int):
        meter = SavedTensorMeter()
        t0 = _time.perf_counter()
        with meter:
            g = adjoint_gradients(soft, loss_fn, x0, steps, solver, cond={"label_weights": w}, method=method)
        return g, _time.perf_counter() - t0, meter.peak

    try:
        import torchdiffeq  # noqa: F401
        have_tde = True
    except ImportError:
        have_tde = False

    for solver in ("euler", "rk4"):
        for steps in steps_list:
            res = {}
            for method in ("backprop", "adjoint"):
                times, peak, g = [], 0, None
                for _ in range(reps + (0 if quick else 1)):
                    g, dt, peak = run_once(method, solver, steps)
                    times.append(dt)
                times = times[1:] if not quick else times
                res[method] = (g, statistics.median(times), peak)
            gb, ga = res["backprop"][0], res["adjoint"][0]
            row = {"solver": solver, "steps": steps,
                   "time_backprop_s": res["backprop"][1], "time_adjoint_s": res["adjoint"][1],
                   "mem_backprop_mib": res["backprop"][2] / 2**20, "mem_adjoint_mib": res["adjoint"][2] / 2**20}
            for key, a, b in (("x0", [ga["x0"]], [gb["x0"]]),
                              ("cond", [ga["cond"]["label_weights"]], [gb["cond"]["label_weights"]]),
                              ("weights", ga["params"], gb["params"])):
                row[f"cos_{key}"], row[f"rel_{key}"] = _cos_rel(a, b)
            if have_tde and solver == "rk4":
                row.update(_torchdiffeq_row(soft, w, loss_fn, x0, steps, gb, reps, quick))
            rows.append(row)
    sfio.save_json(outp / "adjoint.json", {"run": run_dir, "batch": B, "rows": rows})

    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for solver, mk in (("euler", "o"), ("rk4", "s")):
        rs = [r for r in rows if r["solver"] == solver]
        ax.plot([r["steps"] for r in rs], [r["mem_backprop_mib"] for r in rs], marker=mk, label=f"backprop {solver}")
        ax.plot([r["steps"] for r in rs], [r["mem_adjoint_mib"] for r in rs], marker=mk, ls="--", label=f"adjoint {solver}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel("peak saved-tensor memory (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    plotting.save_figure(fig, outp / "adjoint_memory.png")

    lines = ["## Adjoint gradients through sampling (AdjointDPM)", "",
             f"Digits UNet `{run_dir}`, batch {B}, loss = -log p(class 3 | x1) with a continuous class label "
             "(SoftLabelModel, 0.7 one-hot + uniform); gradients w.r.t. the initial noise, the label weights and "
             "all UNet weights. Time: median of "
             f"{reps} run(s) (forward + backward). Memory: peak bytes of tensors saved for backward "
             "(deduplicated by storage; tracemalloc does not see PyTorch's allocator). Agreement: adjoint vs "
             "backprop through the same discrete solver (cosine / relative error); torchdiffeq (its rk4 is the "
             "3/8 rule) against its own backprop.", "",
             "| solver | steps | time backprop (s) | time adjoint (s) | mem backprop (MiB) | mem adjoint (MiB) | "
             "cos/rel x0 | cos/rel label | cos/rel weights |" + (" torchdiffeq adjoint (s) | tde rel x0 vs its backprop |" if have_tde else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if have_tde else "")]
    for r in rows:
        line = (f"| {r['solver']} | {r['steps']} | {r['time_backprop_s']:.3f} | {r['time_adjoint_s']:.3f} | "
                f"{r['mem_backprop_mib']:.2f} | {r['mem_adjoint_mib']:.2f} | "
                f"{r['cos_x0']:.6f} / {r['rel_x0']:.1e} | {r['cos_cond']:.6f} / {r['rel_cond']:.1e} | "
                f"{r['cos_weights']:.6f} / {r['rel_weights']:.1e} |")
        if have_tde:
            line += (f" {r['time_tde_s']:.3f} | {r['rel_x0_tde']:.1e} |" if "time_tde_s" in r else " - | - |")
        lines.append(line)
    lines += ["", "![adjoint memory](adjoint_memory.png)", ""]
    return "\n".join(lines)


def _torchdiffeq_row(soft: "SoftLabelModel", w: Tensor, loss_fn, x0: Tensor, steps: int, gb: Dict[str, Any],
                     reps: int, quick: bool) -> Dict[str, Any]:
    """torchdiffeq.odeint_adjoint (rk4 = its 3/8-rule RK4, fixed step 1/steps) on the same field."""
    import torchdiffeq  # optional peer library

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.soft = soft

        def forward(self, t, x):
            return self.soft(x, t.reshape(1).expand(x.shape[0]).to(x.dtype), label_weights=w)

    f = Field()
    times, g = [], None
    for _ in range(reps + (0 if quick else 1)):
        t0 = _time.perf_counter()
        z = x0.detach().clone().requires_grad_(True)
        x1 = torchdiffeq.odeint_adjoint(f, z, torch.tensor([0.0, 1.0]), method="rk4",
                                        options={"step_size": 1.0 / steps})[-1]
        (g,) = torch.autograd.grad(loss_fn(x1).sum(), [z])
        times.append(_time.perf_counter() - t0)
    times = times[1:] if not quick else times
    z = x0.detach().clone().requires_grad_(True)  # torchdiffeq's own backprop through the same solver
    x1 = torchdiffeq.odeint(f, z, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 1.0 / steps})[-1]
    (gd,) = torch.autograd.grad(loss_fn(x1).sum(), [z])
    _, rel = _cos_rel([g], [gd])
    return {"time_tde_s": statistics.median(times), "rel_x0_tde": rel}
