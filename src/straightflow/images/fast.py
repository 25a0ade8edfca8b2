"""GPU-ready sampling: fixed-step loops without host synchronisation, ``torch.compile``, bf16, files.

:func:`fast_solve` runs the samplers of :data:`FAST_SAMPLERS` (euler / midpoint / heun, each a Butcher
tableau stepped by :func:`~straightflow.solvers.rk.rk_step`) on a time grid held as a device tensor:
step sizes and times are 0-d tensor slices (``ts[i]``, ``ts[i + 1] - ts[i]``), never Python floats
pulled from the device, and nothing in the loop calls ``.item()``, ``bool(tensor)`` or a NaN check,
so a CUDA stream never waits for the host and the loop can be captured in a CUDA graph
(``torch.compile(..., mode="reduce-overhead")``). The NFE is known statically (``evals_per_step *
steps``). Finiteness is checked once, after the loop (``check_finite``).

``bf16=True`` runs the *model* under ``torch.autocast(dtype=torch.bfloat16)`` while the state ``x``
and the updates stay in the input dtype (float32): the velocity is cast back before it touches the
state, so rounding errors do not accumulate across steps (the safe split: network in bf16,
integrator in fp32).

:func:`sample_to_files` draws ``n`` samples in batches (a tqdm bar) with any registered solver,
writes one PNG per image and a ``samples.npz`` (``x`` float32 in [-1, 1], ``y`` labels), all
atomically; finished batches are kept under ``.parts/`` so an interrupted run resumes where it
stopped, with identical images (batch ``k`` uses seed ``seed + k``). Its settings are recorded in
``generation.json`` first, and a directory made with other settings is refused, so a resumed
generation never mixes images of two settings.

:func:`shift_for` gives the resolution-dependent time shift of SD3 (Esser et al. 2024):
``shift = sqrt(pixels / base_pixels)``, applied as ``sigma' = s sigma / (1 + (s - 1) sigma)`` with
``sigma = 1 - t``.
"""
from __future__ import annotations

import io as _io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..grids import make_grid
from ..io import atomic_write_bytes
from ..registry import Registry, UnknownNameError
from ..solvers import SampleResult
from ..solvers.base import NonFiniteError
from ..solvers.noise import initial_noise
from ..solvers.rk import EULER, HEUN, MIDPOINT, Tableau, rk_step
from ..time import resolution_shift

__all__ = ["FAST_SAMPLERS", "FAST_SOLVERS", "FastSampler", "available", "fast_solve", "fast_sample",
           "compile_model", "sample_to_files", "shift_for", "shifted_grid_for", "can_compile", "GENERATION_FILE"]


@dataclass(frozen=True)
class FastSampler:
    """A sampler of the sync-free loop: one Butcher tableau, ``evals_per_step`` = its stages."""

    name: str
    tableau: Tableau

    @property
    def evals_per_step(self) -> int:
        return self.tableau.stages


_SAMPLERS = (FastSampler("euler", EULER), FastSampler("midpoint", MIDPOINT), FastSampler("heun", HEUN))
FAST_SAMPLERS: Registry = Registry("fast sampler")
for _s in _SAMPLERS:
    FAST_SAMPLERS.register(_s.name)(_s)

FAST_SOLVERS: Dict[str, int] = {s.name: s.evals_per_step for s in _SAMPLERS}
"""Samplers of the fast loop and their velocity evaluations per step (from :data:`FAST_SAMPLERS`)."""


def available() -> List[str]:
    """Names :func:`fast_sample` accepts, in registration order."""
    return [s.name for s in _SAMPLERS]


def _sampler(name: str) -> FastSampler:
    if name not in FAST_SAMPLERS:
        raise UnknownNameError(f"fast sampling supports {', '.join(available())}; got {name!r} "
                               "(use straightflow.sample for the other solvers)")
    return FAST_SAMPLERS.get(name)


def shift_for(resolution: Union[int, Sequence[int]], base_resolution: Union[int, Sequence[int]] = 32) -> float:
    """SD3's resolution-dependent shift ``sqrt(m / n)`` for ``m`` pixels against ``n`` at the base
    resolution (where the schedule was tuned; 32 for this library's small image models)."""
    return resolution_shift(resolution, base_resolution)


def shifted_grid_for(steps: int, resolution: Union[int, Sequence[int]], base_resolution: Union[int, Sequence[int]] = 32
                     ) -> Tensor:
    """Uniform grid of ``steps`` steps pushed through the shift for ``resolution`` (float64)."""
    return make_grid("shifted", steps, shift=shift_for(resolution, base_resolution))


def can_compile() -> Optional[str]:
    """None if ``torch.compile`` can build CPU kernels here, else the reason it cannot."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("cc") is None:
        return "torch.compile on CPU needs a C++ compiler (g++/c++/cc) on PATH"
    return None


def compile_model(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model, dynamic=False)``: shapes are fixed within one sampling run, so one graph
    serves every step. ``mode="reduce-overhead"`` adds CUDA graphs on a GPU."""
    return torch.compile(model, mode=mode, backend=backend, dynamic=False)


def _velocity(model: Callable, cond: Dict[str, Any], bf16: bool,
              device_type: str) -> Callable[[Tensor, Tensor, int], Tensor]:
    def f(x: Tensor, t: Tensor, i: int = -1) -> Tensor:
        tb = t.expand(x.shape[0])
        if bf16:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                v = model(x, tb, **cond)
            return v.to(x.dtype)
        return model(x, tb, **cond)

    return f


def fast_solve(model: Callable, x: Tensor, ts: Tensor, solver: str = "euler", cond: Optional[Dict[str, Any]] = None,
               bf16: bool = False) -> Tensor:
    """Integrate ``dx/dt = model(x, t, **cond)`` along the tensor grid ``ts`` with no host syncs:
    ``x <- rk_step(x, t_i, h_i)`` with the sampler's tableau and ``t_i``, ``h_i = t_{i+1} - t_i`` 0-d tensors.

    ``ts`` must be a 1-D tensor on ``x``'s device (any dtype; it is cast to ``x.dtype`` once).
    """
    tableau = _sampler(solver).tableau
    ts = ts.to(device=x.device, dtype=x.dtype)
    f = _velocity(model, dict(cond or {}), bf16, x.device.type)
    for i in range(ts.shape[0] - 1):
        x = rk_step(f, x, ts[i], ts[i + 1] - ts[i], tableau, i=i)
    return x


@torch.no_grad()
def fast_sample(
    model: Callable,
    noise: Union[Tensor, Sequence[int]],
    solver: str = "euler",
    steps: int = 8,
    grid: Union[str, Tensor, Sequence[float]] = "uniform",
    cond: Optional[Dict[str, Any]] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    bf16: bool = False,
    compile: bool = False,
    check_finite: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    grid_options: Optional[Dict[str, Any]] = None,
) -> SampleResult:
    """Like :func:`straightflow.sample` for euler/midpoint/heun, through :func:`fast_solve`.

    ``compile=True`` wraps ``model`` with :func:`compile_model` (the first call pays the
    compilation); pass an already compiled model to reuse it across calls. ``.nfe`` is
    ``evals_per_step * steps`` of the sampler (:data:`FAST_SAMPLERS`).
    """
    sampler = _sampler(solver)
    is_tensor = isinstance(grid, Tensor) or isinstance(grid, (list, tuple))
    g = make_grid(grid, None if is_tensor else steps, **(grid_options or {}))
    if float(g[0]) > float(g[-1]):
        raise ValueError("fast_sample integrates towards the data (increasing t)")
    x, generator = initial_noise(noise, seed, generator, device=device)
    cond = {k: (v.to(x.device) if torch.is_tensor(v) else v) for k, v in (cond or {}).items()}
    net = compile_model(model) if compile else model
    out = fast_solve(net, x, g, solver, cond=cond, bf16=bf16)
    if check_finite and not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"fast sampling ({solver}) produced NaN/Inf")
    steps_done = g.numel() - 1
    return SampleResult(x=out, nfe=sampler.evals_per_step * steps_done, times=g,
                        info={"solver": solver, "steps": steps_done, "bf16": bf16, "compiled": bool(compile)})


# ----------------------------------------------------------------------------- files


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    mode = "L" if img.shape[2] == 1 else "RGB"
    buf = _io.BytesIO()
    Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _to_uint8(x: Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


GENERATION_FILE = "generation.json"


def _settings_diff(have: Dict[str, Any], want: Dict[str, Any]) -> List[str]:
    return [f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)]


def sample_to_files(
    model: Any,
    n: int,
    out_dir: Union[str, Path],
    batch: int = 64,
    solver: str = "euler",
    steps: int = 16,
    grid: str = "uniform",
    label: Optional[int] = None,
    seed: int = 0,
    compile: bool = False,
    bf16: bool = False,
    device: Union[str, torch.device] = "cpu",
    png: bool = True,
    progress: bool = True,
    grid_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Sample ``n`` images in batches of ``batch`` into ``out_dir`` (PNGs + ``samples.npz``).

    ``model``: a pixel velocity model (with ``sample_shape``) or a
    :class:`~straightflow.images.latent.LatentFlow` (sampled in latent space, decoded per batch).
    ``solver``: any registered solver (``straightflow.solvers.available()``); euler, midpoint and
    heun run in the sync-free loop (:func:`fast_sample`), the others through
    :func:`straightflow.sample`. Class-conditional models get ``label`` or, by default, labels
    cycling ``0..K-1``. Resumable (see the module docstring): the settings (and the model's weights
    fingerprint) are written to ``out_dir/generation.json`` before the first batch, and an
    ``out_dir`` holding a generation with other settings is refused before any work, so a
    directory never mixes images of two settings. Returns a summary: files, NFE per sample,
    seconds, images/s.
    """
    from tqdm.auto import tqdm

    from ..io import load_json, save_json
    from ..solvers import get_solver, sample as sf_sample
    from ..straighten.pairs import teacher_fingerprint
    from .latent import LatentFlow

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    spec = get_solver(solver)  # any registered solver; UnknownNameError lists them
    fast = spec.name in FAST_SOLVERS
    if (compile or bf16) and not fast:
        raise ValueError(f"--compile/--bf16 use the sync-free loop, which runs {', '.join(available())}; "
                         f"got solver {spec.name!r}")
    latent = isinstance(model, LatentFlow)
    net = model.model if latent else model
    shape = tuple(model.latent_shape if latent else getattr(model, "sample_shape", ()))
    if len(shape) != 3:
        raise ValueError(f"sample_to_files needs an image model with sample_shape (C, H, W); got {shape}")
    k = getattr(net, "num_classes", None)
    if label is not None and (not k or not 0 <= int(label) < k):
        raise ValueError(f"label {label} needs a class-conditional model with 0 <= label < num_classes ({k})")
    path = (getattr(net, "run_config", None) or {}).get("flow", {}).get("path", "linear")
    out = Path(out_dir)
    settings = {"n": n, "batch": batch, "solver": spec.name, "steps": steps, "grid": grid,
                "grid_options": grid_options or {}, "label": label, "seed": int(seed), "bf16": bool(bf16),
                "space": "latent" if latent else "pixel", "png": bool(png),
                "model": teacher_fingerprint(net)["sha256"]}
    if (out / GENERATION_FILE).is_file():
        have = load_json(out / GENERATION_FILE)
        diff = _settings_diff(have, settings)
        if diff:
            raise ValueError(f"{out} holds a generation with other settings ({'; '.join(diff)}); rerun with the "
                             "same settings to resume or redo it, or write to another --out")
    elif out.is_dir() and any(out.glob("*.png")) or (out / "samples.npz").is_file():
        raise ValueError(f"{out} already holds images not made by this generation; use an empty or new --out")
    dev = torch.device(device)
    if latent:
        model.to(dev)
    else:
        net.to(dev)
    run_net = compile_model(net) if compile else net
    parts = out / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    save_json(out / GENERATION_FILE, settings)
    n_batches = (n + batch - 1) // batch
    nfe = spec.nfe(steps) if not spec.adaptive else None
    t_start = time.perf_counter()
    sampled = 0
    bar = tqdm(total=n, disable=not progress, unit="img", desc="generate", dynamic_ncols=True)
    try:
        for b in range(n_batches):
            lo, hi = b * batch, min(n, (b + 1) * batch)
            part = parts / f"batch_{b:06d}.npz"
            if part.is_file():
                bar.update(hi - lo)
                continue
            noise, _ = initial_noise((hi - lo, *shape), seed=int(seed) + b)
            cond = {}
            y = None
            if k:
                y = torch.full((hi - lo,), int(label)) if label is not None else torch.arange(lo, hi) % k
                cond = {"y": y.to(dev)}
            if fast:
                r = fast_sample(run_net, noise.to(dev), solver=spec.name, steps=steps, grid=grid, cond=cond,
                                bf16=bf16, grid_options=grid_options)
            else:
                with torch.no_grad():
                    r = sf_sample(run_net, noise.to(dev), solver=spec.name, steps=steps, grid=grid, cond=cond or None,
                                  grid_options=grid_options, path=path, seed=int(seed) + b)
            nfe = r.nfe
            x = model.decode(r.x) if latent else r.x.clamp(-1, 1)
            x = x.float().cpu()
            if png:
                for j, img in enumerate(_to_uint8(x)):
                    atomic_write_bytes(out / f"{lo + j:06d}.png", _png_bytes(img))
            arrays = {"x": x.numpy()}
            if y is not None:
                arrays["y"] = y.numpy()
            atomic_write_bytes(part, _npz_bytes(**arrays))
            sampled += hi - lo
            bar.update(hi - lo)
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    xs, ys = [], []
    for b in range(n_batches):
        with np.load(parts / f"batch_{b:06d}.npz", allow_pickle=False) as z:
            xs.append(z["x"])
            if "y" in z.files:
                ys.append(z["y"])
    final = {"x": np.concatenate(xs)}
    if ys:
        final["y"] = np.concatenate(ys)
    atomic_write_bytes(out / "samples.npz", _npz_bytes(**final))
    shutil.rmtree(parts, ignore_errors=True)
    return {"out_dir": str(out), "n": n, "npz": str(out / "samples.npz"), "pngs": n if png else 0, "nfe": nfe,
            "solver": spec.name, "steps": steps, "seed": int(seed), "label": label, "seconds": seconds,
            "sampled_now": sampled, "images_per_s": sampled / seconds if seconds > 0 and sampled else float("nan"),
            "space": "latent" if latent else "pixel", "settings_file": str(out / GENERATION_FILE)}
