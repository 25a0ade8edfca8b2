"""Run directories: ``model.safetensors`` + ``config.json``, written atomically, loaded safely.

Layout of a run directory::

    run_dir/
      model.safetensors   the weights to sample with (the EMA weights when training used EMA)
      config.json         {"model": model.config, "straightflow_version": ..., + caller's keys
                           such as "flow", "train", "data"}

``load`` rebuilds the architecture from ``config["model"]`` with ``build_model`` and loads the
weights with ``strict=True``; anything wrong (missing or corrupt config, missing / truncated /
corrupt / pickled weights, keys or shapes that do not match the config) raises
``CheckpointError`` with a message saying what and where. Pickles are never loaded.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .io import CheckpointError, FilePath, load_json, load_tensors, save_json, save_tensors, tensor_shapes

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

__all__ = [
    "MODEL_FILE", "CONFIG_FILE", "CheckpointError", "save_model", "save_weights", "load", "load_config",
    "load_weights", "straightflow_version", "unwrap", "RunInfo", "run_info", "UnfinishedRunWarning",
    "resolve_run_dir", "hub_dependency_error",
]


class UnfinishedRunWarning(UserWarning):
    """A run directory whose training stopped before the step count it was asked to reach."""


def straightflow_version() -> str:
    try:
        return metadata.version("straightflow")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DataParallel/DDP (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        return model


def _model_config(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise TypeError(
            f"{type(model).__name__} has no model.config dict with a 'name'; only models built by "
            "straightflow.models (or that set model.config = {'name': ..., **kwargs}) can be saved"
        )
    cfg = dict(cfg)
    try:
        json.dumps(cfg)
    except TypeError as e:
        raise TypeError(f"model.config is not JSON-serialisable: {e}") from e
    return cfg


def save_weights(path: FilePath, model: nn.Module) -> None:
    """Write ``model``'s state dict as safetensors, atomically."""
    model = unwrap(model)
    meta = {"format": "pt", "straightflow_version": straightflow_version()}
    cfg = getattr(model, "config", None)
    if isinstance(cfg, Mapping):
        meta["model_config"] = json.dumps(cfg, sort_keys=True)
    save_tensors(path, model.state_dict(), metadata=meta)


def save_model(
    run_dir: FilePath, model: nn.Module, config: Optional[Mapping[str, Any]] = None, weights: str = MODEL_FILE
) -> Path:
    """Save ``model`` into ``run_dir`` as ``weights`` (default model.safetensors) + config.json.

    ``config`` is the caller's run config ("flow", "train", "data", ...); its ``"model"`` and
    ``"straightflow_version"`` entries are filled in here. Both files are written atomically,
    weights first, so config.json never points at weights that were not written. Returns
    ``run_dir`` as a Path.
    """
    model = unwrap(model)
    run_dir = Path(run_dir)
    cfg: Dict[str, Any] = dict(config or {})
    cfg["model"] = _model_config(model)
    cfg["straightflow_version"] = straightflow_version()
    try:
        json.dumps(cfg)
    except TypeError as e:
        raise TypeError(f"run config is not JSON-serialisable: {e}") from e
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / weights, model)
    save_json(run_dir / CONFIG_FILE, cfg)
    return run_dir


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_TRUE = ("1", "true", "yes", "on")


def hub_dependency_error() -> ImportError:
    return ImportError("the Hugging Face Hub needs huggingface_hub: pip install 'straightflow[hub]' (or `make peers`)")


def _looks_like_repo_id(spec: str) -> bool:
    """``org/name`` that is not a local path (nothing of that name, and ``org`` is no local folder)."""
    p = Path(spec)
    return bool(_REPO_ID.match(spec)) and not p.exists() and not p.parent.is_dir()


def resolve_run_dir(spec: FilePath, *, revision: Optional[str] = None, cache_dir: Optional[FilePath] = None,
                    force_download: bool = False, local_files_only: bool = False, token: Any = None) -> Path:
    """A run directory: ``spec`` itself, or, for a Hugging Face Hub repo id (``"org/name"``), its
    snapshot: the one in the local Hub cache (``cache_dir``, else ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``) when present, else downloaded (never under ``HF_HUB_OFFLINE=1`` or
    ``local_files_only``). Only ``*.json``, ``*.safetensors`` and ``README.md`` are fetched."""
    s = str(spec)
    if not _looks_like_repo_id(s):
        return Path(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{s}: no such run directory; as a Hugging Face Hub repo id it needs huggingface_hub "
                              "(pip install 'straightflow[hub]')") from None
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or str(
            Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub")
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    kw = dict(revision=revision, cache_dir=str(cache_dir), allow_patterns=["*.json", "*.safetensors", "README.md"],
              token=token)
    if not force_download:
        try:
            return Path(snapshot_download(s, local_files_only=True, **kw))
        except Exception as e:  # not in the cache (the error type depends on the huggingface_hub version)
            if offline:
                raise CheckpointError(f"{s}: no such run directory, and the Hugging Face Hub repo {s} is not in the "
                                      f"local cache {cache_dir} (offline: nothing is downloaded): {e}") from None
    try:
        return Path(snapshot_download(s, force_download=force_download, **kw))
    except Exception as e:
        raise CheckpointError(f"{s}: no such run directory, and the Hugging Face Hub repo {s} could not be "
                              f"fetched: {e}") from None


def load_config(run_dir: FilePath) -> Dict[str, Any]:
    """Read and check ``run_dir/config.json`` (a dict with a ``"model"`` dict naming a model); a Hub
    repo id is resolved first (:func:`resolve_run_dir`)."""
    run_dir = resolve_run_dir(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; {run_dir} is not a straightflow run directory")
    cfg = load_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    model_cfg = cfg.get("model")
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("name"), str):
        raise CheckpointError(f"{path}: no valid 'model' entry (expected {{\"name\": ..., **kwargs}})")
    return cfg


def _describe(keys: List[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_shapes(path: Path, found: Mapping[str, tuple], expected: Mapping[str, tuple]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} (file {tuple(found[k])}, model {tuple(expected[k])})"
                    for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_describe(shapes)}")
        raise CheckpointError(
            f"{path}: weights do not match the model architecture in the config ({'; '.join(parts)})"
        )


def load_weights(model: nn.Module, path: FilePath, device: str | torch.device = "cpu") -> nn.Module:
    """Load a safetensors state dict into ``model`` with ``strict=True`` and clear errors."""
    path = Path(path)
    state = load_tensors(path)  # CheckpointError for missing / truncated / corrupt / pickle
    _check_shapes(path, {k: tuple(v.shape) for k, v in state.items()},
                  {k: tuple(v.shape) for k, v in model.state_dict().items()})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # pragma: no cover - caught above in practice
        raise CheckpointError(f"{path}: {e}") from e
    return model.to(device)


def load(run_dir: FilePath, device: str | torch.device = "cpu", weights: str = MODEL_FILE) -> nn.Module:
    """Rebuild the model of a run directory and load its weights; returns it in eval mode.

    ``run_dir`` may be a Hugging Face Hub repo id (``"org/name"``, see :func:`resolve_run_dir`).
    ``weights`` is a file name inside ``run_dir`` (or an absolute path). Parameters keep
    ``requires_grad`` as built, so a loaded model can be fine-tuned (reflow). The run config is
    attached as ``model.run_config``.
    """
    from .models import build_model  # local import: models imports nothing from here

    run_dir = resolve_run_dir(run_dir)
    cfg = load_config(run_dir)
    wpath = run_dir / weights
    found = tensor_shapes(wpath)  # the header only: a config can be checked before anything is allocated
    try:
        with torch.device("meta"):  # the architecture's shapes, no memory: a config asking for 400 TB fails here
            skeleton = build_model(cfg["model"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: cannot build the model: {e}") from e
    except (RuntimeError, NotImplementedError):  # a model that cannot be built without data: check after building
        skeleton = None
    if skeleton is not None:
        _check_shapes(wpath, found, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
        del skeleton
    try:
        model = build_model(cfg["model"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: cannot build the model: {e}") from e
    load_weights(model, wpath, device=device)
    model.eval()
    model.run_config = cfg
    message = RunInfo.from_config(cfg).unfinished_message(run_dir)
    if message:
        warnings.warn(message, UnfinishedRunWarning, stacklevel=2)
    return model


@dataclass(frozen=True)
class RunInfo:
    """What a run's ``config.json`` says about its data and flow, read in one place.

    ``data_source`` is what reloads the training data (``load_dataset(info.data_source)``): the
    recorded ``data_source`` (a data set name or a file), else the data's name. ``path`` is the
    flow's path config (a name or ``{"name": ..., **params}``; "linear" when none was recorded),
    as :func:`straightflow.paths.get_path` takes it. ``shape`` is one sample's shape (None when the
    config does not record it, i.e. it was not written by the trainer). ``objective``
    is what the model was trained for (``"flow_matching"``, or e.g. ``"meanflow"`` for an
    average-velocity model, which few-step sampling should use through ``sample_mean``).
    ``data_split`` is the part of a fixed data set it was trained on (``"train"``: the rest is held
    out for evaluation; None: not recorded, i.e. all of it); ``resolution`` the size its images
    were resized to (None: as loaded). ``seed`` is the training seed.
    ``step`` / ``total_steps``: the step its weights are from and the step count it was asked to
    reach (None when not recorded); :attr:`unfinished` is True when training stopped early.
    """

    shape: Optional[Tuple[int, ...]]
    data_source: str
    path: Any = "linear"
    num_classes: Optional[int] = None
    objective: str = "flow_matching"
    config: Dict[str, Any] = field(default_factory=dict, repr=False)
    data_split: Optional[str] = None
    resolution: Optional[int] = None
    seed: int = 0
    step: Optional[int] = None
    total_steps: Optional[int] = None

    AVERAGE_VELOCITY = ("meanflow", "splitmeanflow", "average_velocity")

    @property
    def average_velocity(self) -> bool:
        """An average-velocity model u(x, t, r) (MeanFlow family): sample it with ``sample_mean``."""
        return self.objective in self.AVERAGE_VELOCITY

    @property
    def unfinished(self) -> bool:
        """Training was interrupted: the weights are from an earlier step than the run was asked to reach."""
        return self.step is not None and self.total_steps is not None and self.step < self.total_steps

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RunInfo":
        data = cfg.get("data") or {}
        model = cfg.get("model") or {}
        train = cfg.get("train") or {}
        shape = data.get("shape")
        step, total = cfg.get("step"), train.get("steps")
        return cls(shape=None if shape is None else tuple(int(s) for s in shape),
                   data_source=str(cfg.get("data_source") or data.get("name") or ""),
                   path=(cfg.get("flow") or {}).get("path", "linear"),
                   num_classes=data.get("num_classes") if data.get("labels") else model.get("num_classes"),
                   objective=str((cfg.get("flow") or {}).get("objective", "flow_matching")), config=dict(cfg),
                   data_split=cfg.get("data_split"), seed=int(train.get("seed") or 0),
                   resolution=cfg.get("data_resolution"),
                   step=None if step is None else int(step), total_steps=None if total is None else int(total))

    def load_data(self, split: str = "all", n: Optional[int] = None):
        """The run's data set (or one ``split`` of it) as it was trained on: same source and resolution."""
        from .data import load_dataset  # local import: data imports nothing from here

        if not self.data_source:
            raise CheckpointError("this run records no data source (config.json 'data_source')")
        return load_dataset(self.data_source, n=n, seed=self.seed, split=split, resolution=self.resolution)

    def unfinished_message(self, where: Any = "this run") -> Optional[str]:
        """A sentence for an interrupted run (None for a finished one)."""
        if not self.unfinished:
            return None
        return (f"{where} is unfinished: its weights are from step {self.step} of {self.total_steps} (training was "
                "interrupted); rerun the same training command to finish it")


def run_info(run: Union[nn.Module, FilePath, Mapping[str, Any]]) -> RunInfo:
    """:class:`RunInfo` of a loaded model (its ``run_config``), a run directory or a config dict."""
    if isinstance(run, Mapping):
        return RunInfo.from_config(run)
    if isinstance(run, nn.Module):
        cfg = getattr(run, "run_config", None)
        if not isinstance(cfg, Mapping):
            raise CheckpointError(f"{type(run).__name__} has no run_config; load it with straightflow.load(run_dir)")
        return RunInfo.from_config(cfg)
    return RunInfo.from_config(load_config(run))
