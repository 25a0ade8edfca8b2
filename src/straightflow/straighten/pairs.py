"""Reflow pairs: integrate a teacher from noise to data and store ``(x0, x1[, y])`` on disk.

Rectified flow's reflow step (Liu et al. 2022, "Flow Straight and Fast") trains a new flow on
the deterministic coupling ``(x0, ODE_teacher(x0))``. :func:`generate_pairs` builds that
coupling with any registered solver and writes it as sharded safetensors files plus a
``manifest.json``; :func:`load_pairs` reads it back as a verified
:class:`~straightflow.coupling.PairDataset`.

Layout of a pairs directory::

    out/
      shard-00000.safetensors   x0, x1 (and y) of pairs [0, shard_size)
      shard-00001.safetensors   pairs [shard_size, 2 shard_size) ...
      manifest.json             written last: the recipe, NFE spent, per-shard count + sha256

Determinism and resume. Shard ``k``'s noise (and its random labels) comes from a generator
seeded by ``sha256(seed, k)``, so a shard's content depends only on the recipe and ``k``,
never on which process made it or on what ran before. Every shard is written atomically
(temp file + fsync + rename) and carries in its safetensors metadata the recipe hash and a
sha256 of its tensors. A run that was killed is resumed by calling :func:`generate_pairs`
again with the same arguments: complete shards whose metadata and data hash verify are
skipped, missing or unreadable ones are regenerated, and the result is bit-identical to an
uninterrupted run (same machine and thread count). Nothing is lost or duplicated because a
shard either exists whole under its final name or not at all. Existing shards made with a
different recipe (other teacher weights, solver, seed, ...) raise ``ValueError`` before any
work rather than mixing two data sets.

Parallel. Under ``torchrun`` (or with ``torch.distributed`` already initialised) rank ``r``
makes the shards ``k = r (mod world_size)``; after a barrier rank 0 verifies every shard and
writes the manifest, and all ranks return it. When the environment says ``WORLD_SIZE > 1``
and no process group exists, one is created with the gloo backend and destroyed at the end.

NFE. ``nfe_per_pair`` is the velocity evaluations per sample reported by the solver
(a classifier-free-guided evaluation counts 2); ``total_nfe`` sums it over every stored pair
(work lost in a killed shard is not counted).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..coupling import PairDataset
from ..io import CheckpointError, FilePath, load_json, load_tensors, save_json, save_tensors
from ..models import sample_shape
from ..paths import get_path
from ..solvers import get_solver, initial_noise, sample
from ..solvers.guidance import ClassifierFreeGuidance
from ..train import Interrupted, interruptible

__all__ = ["generate_pairs", "load_pairs", "StoredPairDataset", "shard_seed", "MANIFEST", "FORMAT"]

MANIFEST = "manifest.json"
FORMAT = 1
KIND = "straightflow.pairs"
_META_KEY = "straightflow.pairs"
LABEL_MODES = ("none", "cycle", "random", "tensor")



def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_seed(seed: int, k: int) -> int:
    """Seed of shard ``k``'s generator: the first 63 bits of ``sha256("seed:k")``."""
    h = hashlib.sha256(f"{KIND}:{int(seed)}:{int(k)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- data set


@dataclass
class StoredPairDataset(PairDataset):
    """A :class:`PairDataset` read from disk; ``info`` is the directory's manifest (recipe,
    ``nfe_per_pair``, ``total_nfe``, shard list)."""

    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def total_nfe(self) -> int:
        return int(self.info.get("total_nfe", 0))


# ----------------------------------------------------------------------------- hashing


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _data_sha(tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        h.update(f"{k}:{str(v.dtype)}:{tuple(v.shape)};".encode())
        h.update(_tensor_bytes(v))
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_fingerprint(model: Any) -> Dict[str, Any]:
    """Identify a teacher: sha256 of its weights (``nn.Module``) or of its tensor attributes
    (analytic fields such as :class:`~straightflow.oracle.GaussianMixtureFlow`), plus its class
    and ``config`` when it has one. Two teachers with equal fingerprints give equal pairs."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    if isinstance(model, nn.Module):
        items = model.state_dict().items()
    else:
        items = [(k, v) for k, v in sorted(vars(model).items()) if torch.is_tensor(v)]
        p = getattr(model, "path", None)
        if p is not None and hasattr(p, "config"):
            h.update(json.dumps(p.config(), sort_keys=True).encode())
    for k, v in sorted(items, key=lambda kv: kv[0]):
        h.update(f"{k}:{str(v.dtype)}:{tuple(v.shape)};".encode())
        h.update(_tensor_bytes(v))
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, dict) else None
    return {"class": type(model).__qualname__, "sha256": h.hexdigest(), "config": cfg}


# ----------------------------------------------------------------------------- shard files


def _read_meta(path: Path) -> Optional[Dict[str, Any]]:
    """The shard's ``straightflow.pairs`` metadata from the header only, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        raw = (header.get("__metadata__") or {}).get(_META_KEY)
        return None if raw is None else json.loads(raw)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _read_shard(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Load and verify one shard; CheckpointError if missing, corrupt or inconsistent."""
    tensors = load_tensors(path)
    meta = _read_meta(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a straightflow pairs shard (no {_META_KEY!r} metadata)")
    if "x0" not in tensors or "x1" not in tensors:
        raise CheckpointError(f"{path}: pairs shard without x0/x1 tensors (has {sorted(tensors)})")
    if _data_sha(tensors) != meta.get("data_sha256"):
        raise CheckpointError(f"{path}: corrupt pairs shard (its data does not match the sha256 in its metadata)")
    if tensors["x0"].shape[0] != meta.get("count") or tensors["x1"].shape != tensors["x0"].shape:
        raise CheckpointError(f"{path}: pairs shard holds {tensors['x0'].shape[0]} rows, metadata says {meta.get('count')}")
    return tensors, meta


# ----------------------------------------------------------------------------- distributed


def _dist_context() -> Tuple[int, int, bool]:
    """(rank, world_size, owns_group): use an existing group, or create a gloo one under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- recipe


def _label_spec(model: Any, labels: Any, n: int) -> Tuple[str, Optional[int], Optional[Tensor]]:
    """-> (mode, num_classes, labels tensor for mode 'tensor')."""
    nc = getattr(model, "num_classes", None)
    nc = None if nc is None else int(nc)
    if labels is None or (isinstance(labels, str) and labels.lower() == "none"):
        return "none", nc, None
    if isinstance(labels, str):
        mode = labels.lower()
        if mode not in ("cycle", "random"):
            raise ValueError(f"labels must be None, 'cycle', 'random' or an integer tensor of shape ({n},), got {labels!r}")
        if nc is None:
            raise ValueError(f"labels={labels!r} needs a class-conditional model (model.num_classes)")
        return mode, nc, None
    y = torch.as_tensor(labels)
    if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels tensor must be integer with shape ({n},), got {y.dtype} {tuple(y.shape)}")
    y = y.long().cpu()
    if nc is None:
        nc = int(y.max()) + 1
    if int(y.min()) < 0 or int(y.max()) >= nc:
        raise ValueError(f"labels must lie in [0, {nc}), got range [{int(y.min())}, {int(y.max())}]")
    return "tensor", nc, y


def _grid_json(grid: Any) -> Any:
    if isinstance(grid, str):
        return grid
    if callable(grid):
        raise ValueError("generate_pairs needs a grid name or an explicit list of times (a callable cannot be recorded)")
    return [float(v) for v in torch.as_tensor(grid, dtype=torch.float64).reshape(-1)]


def _recipe_sha(recipe: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- generation


def generate_pairs(
    model: Callable,
    out: FilePath,
    n: int,
    *,
    shape: Optional[Sequence[int]] = None,
    solver: str = "rk4",
    steps: int = 32,
    grid: Any = "uniform",
    labels: Any = None,
    guidance: Optional[float] = None,
    shard_size: int = 1024,
    seed: int = 0,
    path: Any = "linear",
    batch_size: Optional[int] = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    solver_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Integrate ``n`` noise samples to data with ``model`` and store the pairs in ``out``.

    ``x1 = ODE_{0->1}(x0)`` with ``solver``/``steps``/``grid`` (any name in
    ``straightflow.solvers.available()``); ``path`` is the path the teacher was trained on (for
    solvers that need it). ``labels``: None (unconditional), ``"cycle"`` (pair ``i`` gets class
    ``i mod num_classes``), ``"random"`` (drawn with the shard's generator) or an integer tensor
    of shape ``(n,)``. ``guidance=w`` samples with classifier-free guidance
    ``v_null + w (v_cond - v_null)`` (needs labels and ``model.null_class``), InstaFlow-style.
    ``batch_size`` rows are integrated at once (default: a whole shard). Resumable and
    ``torchrun``-parallel: see the module docstring. Returns the manifest (also in
    ``out/manifest.json``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    spec = get_solver(solver)  # UnknownNameError listing the valid solvers
    path_obj = get_path(path)
    shp = sample_shape(model, shape)
    mode, num_classes, y_all = _label_spec(model, labels, n)
    if guidance is not None:
        guidance = float(guidance)
        if mode == "none":
            raise ValueError("guidance needs class labels: pass labels='cycle', 'random' or a tensor")
        if getattr(model, "null_class", None) is None:
            raise ValueError("guidance needs a class-conditional model with a null class (model.null_class)")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    opts = dict(solver_options or {})
    try:
        json.dumps(opts)
    except TypeError as e:
        raise ValueError(f"solver_options must be JSON-serialisable: {e}") from e
    bs = shard_size if batch_size is None else min(batch_size, shard_size)
    num_shards = math.ceil(n / shard_size)
    recipe = {
        "n": n, "shape": list(shp), "dtype": str(dtype).replace("torch.", ""), "solver": spec.name,
        "steps": steps, "grid": _grid_json(grid), "path": path_obj.config(), "labels": mode,
        "labels_sha256": None if y_all is None else _data_sha({"y": y_all}), "num_classes": num_classes,
        "guidance": guidance, "seed": int(seed), "shard_size": shard_size, "batch_size": bs,
        "solver_options": opts, "teacher": teacher_fingerprint(model),
    }
    rsha = _recipe_sha(recipe)
    out = Path(out)
    rank, world, owns = _dist_context()
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        _barrier(world)
        _check_existing(out, rsha, num_shards)
        mine = list(range(rank, num_shards, world))
        _generate_shards(model, out, mine, recipe, rsha, spec, path_obj, y_all, guidance, opts,
                         progress and rank == 0, dtype)
        _barrier(world)
        if rank == 0:
            manifest = _write_manifest(out, recipe, rsha, num_shards, world)
        _barrier(world)
        if rank != 0:
            manifest = load_json(out / MANIFEST)
        return manifest
    finally:
        if owns:
            dist.destroy_process_group()


def _check_existing(out: Path, rsha: str, num_shards: int) -> None:
    """Refuse to mix recipes: any readable shard or manifest with another recipe is an error."""
    mpath = out / MANIFEST
    if mpath.is_file():
        try:
            m = load_json(mpath)
        except CheckpointError:
            m = None
        if isinstance(m, dict) and m.get("recipe_sha256") not in (None, rsha):
            raise ValueError(f"{out} already holds pairs made with a different recipe ({_diff_hint(m)}); "
                             "use a new output directory or the same settings to resume")
    for p in sorted(out.glob("shard-*.safetensors")):
        meta = _read_meta(p)
        if meta is not None and meta.get("recipe_sha256") != rsha:
            raise ValueError(f"{p} was made with a different recipe (teacher, solver, steps, seed, n, shard size "
                             "or labels differ); use a new output directory or the same settings to resume")


def _diff_hint(m: Dict[str, Any]) -> str:
    keys = ("n", "solver", "steps", "seed", "shard_size", "labels", "guidance")
    return ", ".join(f"{k}={m.get(k)!r}" for k in keys)


def _shard_labels(k: int, start: int, count: int, mode: str, num_classes: Optional[int],
                  y_all: Optional[Tensor], g: torch.Generator) -> Optional[Tensor]:
    if mode == "none":
        return None
    if mode == "cycle":
        return torch.arange(start, start + count, dtype=torch.long) % num_classes
    if mode == "random":
        return torch.randint(0, num_classes, (count,), generator=g, dtype=torch.long)
    return y_all[start:start + count].clone()


def _model_device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def _make_shard(model, k: int, recipe: Dict[str, Any], rsha: str, spec, path_obj, y_all, guidance, opts, dtype
                ) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    n, size, bs = recipe["n"], recipe["shard_size"], recipe["batch_size"]
    start = k * size
    count = min(size, n - start)
    seed_k = shard_seed(recipe["seed"], k)
    x0, g = initial_noise((count, *recipe["shape"]), seed_k, dtype=dtype)
    y = _shard_labels(k, start, count, recipe["labels"], recipe["num_classes"], y_all, g)
    dev = _model_device(model)
    sgen = torch.Generator(device=dev).manual_seed(seed_k ^ 0x5DEECE66D) if spec.stochastic else None
    velocity = ClassifierFreeGuidance(model, guidance) if guidance is not None else model
    x1 = torch.empty_like(x0)
    nfe_sum, nfe_max = 0, 0
    grid = recipe["grid"]
    with torch.no_grad():
        for b in range(0, count, bs):
            xb = x0[b:b + bs].to(dev)
            cond = None if y is None else {"y": y[b:b + bs].to(dev)}
            res = sample(velocity, xb, solver=spec.name, steps=None if isinstance(grid, list) else recipe["steps"],
                         grid=grid, cond=cond, generator=sgen, path=path_obj, **opts)
            x1[b:b + bs] = res.x.to("cpu", dtype)
            nfe_sum += int(res.nfe) * xb.shape[0]
            nfe_max = max(nfe_max, int(res.nfe))
    tensors = {"x0": x0, "x1": x1}
    if y is not None:
        tensors["y"] = y
    meta = {"recipe_sha256": rsha, "index": k, "start": start, "count": count, "nfe": nfe_sum,
            "nfe_per_pair": nfe_max, "data_sha256": _data_sha(tensors), "format": FORMAT}
    return tensors, meta


def _generate_shards(model, out: Path, mine: List[int], recipe, rsha, spec, path_obj, y_all, guidance, opts,
                     progress: bool, dtype) -> None:
    from tqdm.auto import tqdm

    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    bar = tqdm(total=len(mine), disable=not progress, unit="shard", desc="pairs", dynamic_ncols=True)
    try:
        with interruptible() as stop:  # Ctrl-C / SIGTERM: finish the shard in flight, keep it, stop
            _shard_loop(model, out, mine, recipe, rsha, spec, path_obj, y_all, guidance, opts, dtype, bar, stop)
    finally:
        bar.close()
        if was_training:
            model.train()


def _shard_loop(model, out: Path, mine: List[int], recipe, rsha, spec, path_obj, y_all, guidance, opts, dtype, bar,
                stop) -> None:
    for done, k in enumerate(mine, start=1):
        p = out / shard_name(k)
        if p.exists():
            try:
                _, meta = _read_shard(p)
                if meta.get("recipe_sha256") == rsha and meta.get("index") == k:
                    bar.update(1)
                    continue
                raise ValueError(f"{p} was made with a different recipe; use a new output directory")
            except CheckpointError as e:
                warnings.warn(f"regenerating unreadable shard: {e}")
        tensors, meta = _make_shard(model, k, recipe, rsha, spec, path_obj, y_all, guidance, opts, dtype)
        save_tensors(p, tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        bar.update(1)
        if stop and done < len(mine):
            raise Interrupted(done, len(mine), out, unit="shard")


def _write_manifest(out: Path, recipe: Dict[str, Any], rsha: str, num_shards: int, world: int) -> Dict[str, Any]:
    shards, total, per_pair = [], 0, 0
    for k in range(num_shards):
        p = out / shard_name(k)
        if not p.exists():
            raise CheckpointError(f"{p}: shard missing after generation (did a rank fail?); rerun to resume")
        _, meta = _read_shard(p)
        if meta.get("recipe_sha256") != rsha or meta.get("index") != k:
            raise CheckpointError(f"{p}: shard does not belong to this recipe")
        shards.append({"file": p.name, "index": k, "start": meta["start"], "count": meta["count"],
                       "nfe": meta["nfe"], "sha256": _file_sha(p)})
        total += int(meta["nfe"])
        per_pair = max(per_pair, int(meta["nfe_per_pair"]))
    manifest = {"format": FORMAT, "kind": KIND, **recipe, "recipe_sha256": rsha, "num_shards": num_shards,
                "nfe_per_pair": per_pair, "total_nfe": total, "world_size": world, "complete": True,
                "shards": shards}
    save_json(out / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------- loading


def load_pairs(directory: FilePath, verify: bool = True) -> StoredPairDataset:
    """Read a pairs directory written by :func:`generate_pairs` into a :class:`StoredPairDataset`.

    Checks the manifest, that every listed shard exists, and (``verify=True``) each shard file's
    sha256 against the manifest and its tensors against their own hash. Any problem raises
    :class:`~straightflow.io.CheckpointError` naming the file. ``ds.info`` is the manifest.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: pairs directory not found")
    mpath = d / MANIFEST
    if not mpath.is_file():
        k = len(list(d.glob("shard-*.safetensors")))
        if k:
            raise CheckpointError(f"{d}: no {MANIFEST} but {k} shard file(s): generation was interrupted; "
                                  "rerun generate_pairs (or `straightflow pairs`) with the same settings to resume")
        raise CheckpointError(f"{d}: not a pairs directory (no {MANIFEST})")
    m = load_json(mpath)
    if not isinstance(m, dict) or m.get("kind") != KIND or m.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a straightflow pairs manifest (format {FORMAT})")
    x0s, x1s, ys = [], [], []
    for s in m.get("shards", []):
        p = d / s["file"]
        if not p.is_file():
            raise CheckpointError(f"{p}: shard listed in the manifest is missing; rerun generate_pairs with the "
                                  "same settings to regenerate it")
        if verify and _file_sha(p) != s["sha256"]:
            raise CheckpointError(f"{p}: corrupt shard (sha256 differs from the manifest); delete it and rerun "
                                  "generate_pairs with the same settings to regenerate it")
        tensors = _read_shard(p)[0] if verify else load_tensors(p)
        if tensors["x0"].shape[0] != s["count"]:
            raise CheckpointError(f"{p}: holds {tensors['x0'].shape[0]} pairs, manifest says {s['count']}")
        x0s.append(tensors["x0"])
        x1s.append(tensors["x1"])
        if "y" in tensors:
            ys.append(tensors["y"])
    if len(x0s) != m.get("num_shards") or sum(len(v) for v in x0s) != m.get("n"):
        raise CheckpointError(f"{mpath}: manifest lists {len(x0s)} shards / {sum(len(v) for v in x0s)} pairs, "
                              f"expected {m.get('num_shards')} / {m.get('n')}")
    y = torch.cat(ys) if ys else None
    try:
        return StoredPairDataset(torch.cat(x0s), torch.cat(x1s), y=y, num_classes=m.get("num_classes"),
                                 name=f"pairs:{d.name}", info=m)
    except ValueError as e:
        raise CheckpointError(f"{d}: {e}") from e
