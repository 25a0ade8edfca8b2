"""Runs from a recipe: the default model for a data set, a run trained from a data set name or
file, and a run trained once and cached.

``train_recipe(recipe, out)`` (a :class:`~straightflow.recipe.Recipe`; ``train_run(data, out, steps,
**keywords)`` builds one from keyword arguments) is what ``straightflow train`` does: load the data,
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
from .recipe import DataSpec, ModelSpec, Objective, Recipe
from .train import TrainResult, TrainSettings, max_steps_cap, train

__all__ = ["default_model_config", "train_run", "train_recipe", "cached_run", "RECIPE_FILE"]

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

    The keyword form of :func:`train_recipe`: it builds the :class:`~straightflow.recipe.Recipe` and
    trains it. ``settings``: the other :class:`~straightflow.train.TrainSettings` fields (``batch_size``,
    ``lr``, ``lr_schedule``, ``grad_clip``, ``ckpt_every``, ``seed``, ``device`` (``"auto"`` allowed),
    ``progress``, ...); ``ema`` is the EMA decay (with the trainer's EMA warm-up). A Dataset ``data`` is
    trained as given (``n`` and ``resolution`` apply to a name or file). ``allow_recipe_change`` and
    ``desc``: see :class:`~straightflow.train.Trainer`.
    """
    dataset = data if isinstance(data, Dataset) else None
    spec = DataSpec(dataset.name if dataset is not None else str(data), n=None if dataset is not None else n,
                    resolution=None if dataset is not None else resolution, conditional=bool(conditional))
    recipe = Recipe(data=spec, train=TrainSettings(steps=steps, ema_decay=ema, warmup=warmup, **settings),
                    model=ModelSpec(model, hidden=hidden, depth=depth, base_channels=base_channels),
                    objective=Objective(path=path, time_dist=time_dist, loss=loss, coupling=coupling,
                                        cond_dropout=cond_dropout))
    return train_recipe(recipe, out, dataset=dataset, allow_recipe_change=allow_recipe_change, desc=desc)


def train_recipe(recipe: Recipe, out: Optional[PathLike], *, dataset: Optional[Dataset] = None,
                 allow_recipe_change: bool = False, desc: str = "train") -> TrainResult:
    """Train ``recipe`` (a :class:`~straightflow.recipe.Recipe`) into the run directory ``out``: what
    ``straightflow train`` does.

    Loads ``recipe.data`` (or trains on ``dataset`` when given), builds the default model for its shape
    (``recipe.model``; class-conditional when the data has labels and ``recipe.data.conditional``),
    wraps it in a :class:`~straightflow.flow.Flow` (``recipe.objective``; ``cond_dropout`` defaults to
    0.1 for labelled data, so classifier-free guidance works, else 0) and trains it with
    ``recipe.train``. The initial weights are drawn from the seed. A named data set or file is trained
    on its ``"train"`` split (:func:`straightflow.data.load_dataset`; a fixed set holds out a fifth for
    evaluation), recorded as ``data_split``; the data's name or file as ``data_source``, a resize as
    ``data_resolution``, and the recipe itself as ``"recipe"`` in ``config.json``. Inside a
    :func:`straightflow.train.max_steps` block the recipe is capped first (the recorded recipe is the
    one that ran).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a straightflow.recipe.Recipe, got {type(recipe).__name__}")
    recipe = recipe.with_max_steps(max_steps_cap())
    d, m, o = recipe.data, recipe.model, recipe.objective
    seed = recipe.train.seed
    extra: Dict[str, Any] = {}
    if dataset is not None:
        ds, source = dataset, dataset.name
    else:
        ds, source = load_dataset(d.source, n=d.n, seed=seed, split="train", resolution=d.resolution), d.source
        extra["data_split"] = "train"
        if d.resolution is not None:
            extra["data_resolution"] = int(d.resolution)
    num_classes = ds.num_classes if (d.conditional and ds.y is not None) else None
    cfg = default_model_config(ds.shape, num_classes, hidden=m.hidden, depth=m.depth, base_channels=m.base_channels)
    if m.name != "auto" and models.MODELS.canonical(m.name) != cfg["name"]:
        raise ValueError(f"model {m.name!r} does not fit data of shape {tuple(ds.shape)}; use 'auto' "
                         f"(here: {cfg['name']})")
    net = models.build_model(cfg, seed=seed)  # the initial weights are a function of the seed
    cond_dropout = o.cond_dropout
    if cond_dropout is None:
        cond_dropout = 0.1 if num_classes else 0.0
    if not num_classes:
        ds = Dataset(ds.x, name=ds.name)
    flow = Flow(net, path=o.path, time_dist=o.time_dist, loss=o.loss, coupling=o.coupling, cond_dropout=cond_dropout)
    extra["recipe"] = recipe.to_dict()
    return train(flow, ds, out=out, settings=recipe.train, extra_config={"data_source": source, **extra},
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
    Inside a :func:`straightflow.train.max_steps` block (smoke tests) a capped run goes to ``<directory>-smoke<N>``,
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
