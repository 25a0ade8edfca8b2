"""Runs from a recipe: the default model for a data set, a run trained from a data set name or
file, and a run trained once and cached.

``train_run(data, out, steps, **recipe)`` is what ``straightflow train`` does: load the data,
build the default model for its shape (an MLP for vectors, a UNet for square images, class-
conditional when the data has labels), wrap it in a :class:`~straightflow.flow.Flow` and train it
into the run directory ``out`` (resuming when ``out`` holds a training state). Bad input raises
``ValueError`` with what is accepted.

``cached_run(directory, recipe)`` trains a recipe into ``directory`` once and reuses it afterwards:
the recipe is written beside the weights (``recipe.json``), a directory holding another recipe is
refused, and an interrupted training resumes from its checkpoint on the next call. The benchmarks
and the streaming server's default model share it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from . import checkpoint, models
from .data import Dataset, load_dataset
from .flow import Flow
from .io import atomic_write_bytes, load_json
from .train import TrainResult, TrainSettings, max_steps_cap, train

__all__ = ["default_model_config", "train_run", "cached_run", "RECIPE_FILE"]

RECIPE_FILE = "recipe.json"
PathLike = Union[str, os.PathLike]


def default_model_config(shape: Sequence[int], num_classes: Optional[int] = None, *, hidden: int = 256,
                         depth: int = 4, base_channels: int = 32) -> Dict[str, Any]:
    """The model ``straightflow train`` builds for samples of ``shape``.

    Vectors ``(D,)``: a residual MLP (``hidden`` wide, ``depth`` blocks). Square images ``(C, H, H)``:
    a UNet with ``base_channels`` and channel multipliers (1, 2) for even sides, (1, 2, 2) from 28
    pixels on (1 for odd sides). ``num_classes`` makes it class-conditional (with a null class).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return {"name": "mlp", "dim": shape[0], "hidden": int(hidden), "depth": int(depth), "num_classes": num_classes}
    if len(shape) == 3:
        c, h, w = shape
        if h != w:
            raise ValueError(f"the default UNet needs square images, got {h}x{w}")
        mults = [1, 2] if h % 2 == 0 else [1]
        if h >= 28 and h % 4 == 0:
            mults = [1, 2, 2]
        return {"name": "unet", "in_channels": c, "resolution": h, "base_channels": int(base_channels),
                "channel_mults": mults, "num_classes": num_classes}
    raise ValueError(f"no default model for data of shape {shape}; vectors (D,) or images (C, H, W)")


def train_run(data: Union[str, PathLike, Dataset], out: Optional[PathLike], steps: int, *, n: Optional[int] = None,
              model: str = "auto", hidden: int = 256, depth: int = 4, base_channels: int = 32,
              conditional: bool = True, path: Any = "linear", time_dist: Any = "uniform", loss: Any = "mse",
              coupling: Any = "independent", cond_dropout: Optional[float] = None, ema: float = 0.999,
              warmup: int = 100, allow_recipe_change: bool = False, desc: str = "train",
              resolution: Optional[int] = None, **settings: Any) -> TrainResult:
    """Train the default model on ``data`` (a data set name, a file or folder, or a Dataset) into ``out``.

    ``settings``: the other :class:`~straightflow.train.TrainSettings` fields (``batch_size``, ``lr``,
    ``lr_schedule``, ``grad_clip``, ``ckpt_every``, ``seed``, ``device`` (``"auto"`` allowed),
    ``progress``, ...); ``ema`` is the EMA decay (with the trainer's EMA warm-up). ``cond_dropout``
    defaults to 0.1 for labelled data (so classifier-free guidance works) and 0 otherwise. The
    initial weights are drawn from ``seed``. A named data set or file is trained on its ``"train"``
    split (:func:`straightflow.data.load_dataset`; a fixed set holds out a fifth for evaluation),
    recorded as ``data_split``; the data's name or file is recorded as ``data_source`` in
    ``config.json`` so commands can reload it; ``resolution`` resizes images (recorded as
    ``data_resolution``). ``allow_recipe_change`` and ``desc``: see :class:`~straightflow.train.Trainer`.
    """
    seed = int(settings.get("seed", 0))
    extra: Dict[str, Any] = {}
    if isinstance(data, Dataset):
        ds, source = data, data.name
    else:
        ds, source = load_dataset(data, n=n, seed=seed, split="train", resolution=resolution), str(data)
        extra["data_split"] = "train"
        if resolution is not None:
            extra["data_resolution"] = int(resolution)
    num_classes = ds.num_classes if (conditional and ds.y is not None) else None
    cfg = default_model_config(ds.shape, num_classes, hidden=hidden, depth=depth, base_channels=base_channels)
    if model != "auto" and models.MODELS.canonical(model) != cfg["name"]:
        raise ValueError(f"model {model!r} does not fit data of shape {tuple(ds.shape)}; use 'auto' "
                         f"(here: {cfg['name']})")
    net = models.build_model(cfg, seed=seed)  # the initial weights are a function of the seed
    if cond_dropout is None:
        cond_dropout = 0.1 if num_classes else 0.0
    if not num_classes:
        ds = Dataset(ds.x, name=ds.name)
    flow = Flow(net, path=path, time_dist=time_dist, loss=loss, coupling=coupling, cond_dropout=cond_dropout)
    recipe = TrainSettings(steps=steps, ema_decay=ema, warmup=warmup, **settings)
    return train(flow, ds, out=out, settings=recipe, extra_config={"data_source": source, **extra},
                 allow_recipe_change=allow_recipe_change, desc=desc)


def _complete(directory: Path) -> bool:
    return (directory / checkpoint.MODEL_FILE).is_file() and (directory / RECIPE_FILE).is_file()


def cached_run(directory: PathLike, recipe: Mapping[str, Any], progress: bool = True,
               log: Optional[Any] = None, device: Optional[str] = None) -> Path:
    """``directory`` holding ``train_run(**recipe)``'s result, trained now only if it is not there yet.

    ``recipe``: the keyword arguments of :func:`train_run` (``data`` and ``steps`` required; ``out``
    is ``directory``). The recipe is stored beside the weights once training has finished; a
    directory finished with another recipe raises ``ValueError`` (pick another directory), and an
    unfinished one resumes from its last checkpoint. ``log(msg)`` hears when training starts.
    Under ``$STRAIGHTFLOW_MAX_STEPS`` (smoke tests) a capped run goes to ``<directory>-smoke<N>``,
    never into the directory a real run would be cached in; the returned path says where.
    ``device`` is where to train (not part of the recipe: the result is the same run).
    """
    directory = Path(directory)
    want = json.loads(json.dumps(dict(recipe)))  # JSON-normal form (tuples -> lists) for the comparison
    cap = max_steps_cap()
    if cap is not None and "steps" in want and cap < int(want["steps"]):  # a smoke test never fills the real cache
        directory = directory.with_name(f"{directory.name}-smoke{cap}")
    for key in ("data", "steps"):
        if key not in want:
            raise ValueError(f"a cached-run recipe needs {key!r}; got keys {sorted(want)}")
    if _complete(directory):
        have = load_json(directory / RECIPE_FILE)
        if have != want:
            changed = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{directory} holds a run trained with another recipe (differs in {', '.join(changed)}); "
                             "use another directory or delete this one")
        return directory
    if log is not None:
        log(f"training {want['data']} ({want['steps']} steps) into {directory}; reused afterwards")
    kw = dict(want)
    kw.setdefault("progress", progress)
    if device is not None:
        kw.setdefault("device", str(device))
    train_run(kw.pop("data"), directory, kw.pop("steps"), **kw)
    atomic_write_bytes(directory / RECIPE_FILE, (json.dumps(want, indent=1, sort_keys=True) + "\n").encode())
    return directory
