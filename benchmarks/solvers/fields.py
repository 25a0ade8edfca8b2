"""The velocity fields the solver suite measures (Gaussian-mixture oracles, trained 2D and digits flows,
the guided digits field), their noise batches and the float64 reference solution."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from straightflow.checkpoint import run_info
from straightflow.oracle import GaussianMixtureFlow
from straightflow.paths import get_path
from straightflow.report import reference_data
from straightflow.solvers import available, initial_noise, sample
from straightflow.solvers.guidance import ClassifierFreeGuidance

from ..harness import cached_model, log_to
from .settings import FIELD_ALIASES, GUIDANCE, QUICK_SIZES, REF_RK4_STEPS, REF_RTOL, SIZES


@dataclass
class Field:
    name: str
    title: str
    model: Callable  # velocity model(x, t, **cond) at run dtype
    dtype: torch.dtype
    noise: Tensor
    calib: Tensor
    model64: Callable | None = None  # float64 version for the reference
    cond: dict[str, Any] | None = None
    calib_cond: dict[str, Any] | None = None
    n_candidates: int = 32
    ref: Tensor | None = None
    ref_desc: str = ""
    data: Tensor | None = None  # held-out data for the distribution metric
    metric: str | None = None
    source: str = ""
    raw: Callable | None = None  # the network itself (``model`` is it under guidance)
    raw64: Callable | None = None
    guidance: float | None = None
    evals_per_call: int = 1  # counted NFE per evaluation (2 under classifier-free guidance)
    extractor: str = "digits"
    cal_run: Any = None  # the calibrations of this field (solvers_calibrated.CalibrationRun)

    def __post_init__(self) -> None:
        if self.raw is None:
            self.raw = self.model
        if self.raw64 is None:
            self.raw64 = self.model64


def fixed_noise(shape, seed: int, dtype: torch.dtype) -> Tensor:
    """Noise drawn in float64 then cast, so the float32 fields see the oracle fields' numbers."""
    return initial_noise(tuple(shape), seed=seed, dtype=torch.float64)[0].to(dtype)


def train_settings(kind: str, quick: bool) -> dict[str, Any]:
    if kind == "mnist":
        return dict(data="mnist", steps=100 if quick else 4000, batch_size=64, lr=1e-3, warmup=100,
                    base_channels=8 if quick else 16, conditional=False, lr_schedule="cosine")
    if kind in ("digits", "digits-cfg"):
        if kind == "digits-cfg":  # class-conditional with label dropout 0.1 (research/train_cfg_digits.py)
            return {**train_settings("digits", quick), "conditional": True}
        return dict(data="digits", steps=150 if quick else 1500, batch_size=128, lr=1e-3, warmup=50,
                    base_channels=8 if quick else 16, conditional=False, lr_schedule="cosine")
    return dict(data=kind, steps=200 if quick else 2500, n=50_000, batch_size=256, lr=2e-3, warmup=100,
                hidden=128, depth=3, lr_schedule="cosine")


def trained_model(kind: str, out: Path, runs: dict[str, str] | None, quick: bool, seed: int,
                   progress: bool) -> tuple[torch.nn.Module, str]:
    key = kind if kind in ("digits", "digits-cfg", "mnist") else "2d"
    recipe = {**train_settings(kind, quick), "seed": seed, "ckpt_every": 10**9}
    model, run_dir, how = cached_model(out, f"{kind}-quick" if quick else kind, recipe, run=(runs or {}).get(key),
                                       log=log_to("solvers", progress))
    return model, f"`{run_dir}`, {how}"


def make_field(name: str, out: Path, runs, quick: bool, seed: int, n: int | None, progress: bool) -> Field:

    sizes = QUICK_SIZES if quick else SIZES.get(name, (512, 64, 24))
    n_eval = int(n) if n else sizes[0]
    n_cal = sizes[1]
    if name in ("oracle2d", "oracle64d"):
        dim = 2 if name == "oracle2d" else 64
        gm = GaussianMixtureFlow.random(dim, 8, seed=seed)
        f64 = torch.float64
        return Field(name, f"Gaussian-mixture oracle, {dim}D (exact velocity, float64)", gm, f64,
                     fixed_noise((n_eval, dim), seed, f64), fixed_noise((n_cal, dim), seed + 1000, f64), model64=gm,
                     n_candidates=sizes[2], source=f"GaussianMixtureFlow.random({dim}, 8, seed={seed})")
    kind = FIELD_ALIASES.get(name, name)
    if kind == "mnist":
        from straightflow.data import mnist_path
        if mnist_path() is None:
            raise FieldSkipped("MNIST data (mnist_test_10k.npz) not found: set STRAIGHTFLOW_DATA or put it in "
                               "../shared/data (nothing is downloaded)")
    model, source = trained_model(kind, out, runs, quick, seed, progress)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = run_info(model)
    pname = get_path(info.path).name
    if pname != "linear":
        raise ValueError(f"{name}: the run was trained on the {pname!r} path; the peers' conventions need 'linear'")
    shape, data_source = info.shape, info.data_source
    f32 = torch.float32
    noise, calib = fixed_noise((n_eval, *shape), seed, f32), fixed_noise((n_cal, *shape), seed + 1000, f32)
    cond = calib_cond = None
    nc = getattr(model, "num_classes", None)
    if nc:  # a class-conditional run: labels cycle through the classes
        cond = {"y": torch.arange(n_eval) % nc}
        calib_cond = {"y": torch.arange(n_cal) % nc}
    model64 = copy.deepcopy(model).double()
    raw, raw64, guidance, epc, extractor = model, model64, None, 1, "digits"
    if kind == "digits-cfg":
        if not nc:
            raise ValueError("the digits-cfg run is not class-conditional")
        guidance, epc = GUIDANCE, 2
        model, model64 = ClassifierFreeGuidance(raw, GUIDANCE), ClassifierFreeGuidance(raw64, GUIDANCE)
    if kind in ("digits", "digits-cfg"):
        data, metric = reference_data(data_source, 0).x, "fd"
        title = ("class-conditional digits 8x8 UNet, classifier-free guidance 2 (float32)" if guidance
                 else "digits 8x8, UNet flow (float32)")
    elif kind == "mnist":
        data, metric, extractor = reference_data(data_source, 0).x, "fd", "mnist"
        title = "MNIST 28x28, UNet flow (float32)"
    else:
        data, metric = reference_data(data_source, 4000 if not quick else 600).x, "w2"
        title = f"{data_source} 2D, MLP flow (float32)"
    return Field(name, title, model, f32, noise, calib, model64=model64, cond=cond, calib_cond=calib_cond,
                 n_candidates=sizes[2], data=data, metric=metric, source=source, raw=raw, raw64=raw64,
                 guidance=guidance, evals_per_call=epc, extractor=extractor)


class FieldSkipped(RuntimeError):
    """A field that cannot run here (its data is absent); the report says why."""


@torch.no_grad()
def reference_solution(fld: Field, rtol: float = REF_RTOL) -> None:

    x = fld.noise.to(torch.float64)
    t0 = time.perf_counter()
    if "dopri5" in available():
        r = sample(fld.model64, x, solver="dopri5", steps=1, cond=fld.cond, rtol=rtol, atol=rtol)
        desc = f"straightflow `dopri5` (rtol = atol = {rtol:g}, float64)"
    else:
        r = sample(fld.model64, x, solver="rk4", steps=REF_RK4_STEPS, cond=fld.cond)
        desc = f"straightflow `rk4`, {REF_RK4_STEPS} uniform steps, float64"
    fld.ref = r.x
    fld.ref_desc = f"{desc}: {r.nfe} NFE, {time.perf_counter() - t0:.1f} s"

