"""Hugging Face Hub directories for runs and models: ``save_pretrained``, ``from_pretrained``,
``push_to_hub``, through ``huggingface_hub``'s :class:`~huggingface_hub.ModelHubMixin`.

A Hub directory is a straightflow run directory (``model.safetensors`` + ``config.json``, loadable
with :func:`straightflow.load`) plus a generated model card (``README.md``): the data it was
trained on and which part was held out, the recipe (model, flow objective, training settings,
whether training finished), and the measured figures with their data-vs-data floors when given
(:func:`measure` computes them on the run's held-out data). Nothing is pickled.

    import straightflow as sf
    m = sf.FlowModel.from_run("runs/digits")            # or FlowModel(model) for a loaded/trained model
    m.save_pretrained("hub/digits", figures=sf.hub.measure(m.model, nfes=(8, 100)))
    m.push_to_hub("org/digits-flow")                     # needs a token; creates the repo
    model = sf.load("org/digits-flow")                  # resolved from the local Hub cache, else downloaded

:func:`straightflow.load` accepts a Hub repo id (``"org/name"``) wherever it takes a run directory:
the snapshot in the local Hub cache (``$HF_HUB_CACHE``) is used when there is one (and only it under
``HF_HUB_OFFLINE=1``), else it is downloaded. ``huggingface_hub`` is an optional dependency
(``pip install 'straightflow[hub]'``; ``make peers`` installs it too).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torch import nn

from . import checkpoint
from .checkpoint import RunInfo, hub_dependency_error, resolve_run_dir

try:
    from huggingface_hub import ModelCard, ModelHubMixin
except ImportError:  # pragma: no cover - the optional dependency is absent
    ModelHubMixin = None

__all__ = ["FlowModel", "measure", "model_card", "CARD_FILE"]

CARD_FILE = "README.md"
TAGS = ["straightflow", "rectified-flow", "flow-matching"]


def measure(model: nn.Module, nfes: Sequence[int] = (8, 100), solver: str = "euler", n: int = 2000,
            seed: int = 0) -> List[Dict[str, Any]]:
    """The figures for a model card: ``model`` (loaded from a run, so it knows its data) sampled at each
    NFE and scored on its held-out data with the floor (:func:`straightflow.report.evaluate_model`)."""
    from . import report

    info = checkpoint.run_info(model)
    ref = report.run_reference(info, max(2 * n, 4))
    rows, _ = report.evaluate_model(model, ref.data, nfes, solver=solver, n=n, seed=seed, path=info.path,
                                    floor_reference=ref.floor)
    return [{"solver": r.solver, "nfe": r.nfe, "metric": r.metric, "samples": r.n, "value": r.value,
             "floor": r.floor, "ratio": r.ratio, "reference": ref.description} for r in rows]


def _recipe_lines(cfg: Mapping[str, Any]) -> List[str]:
    info = RunInfo.from_config(cfg)
    model = dict(cfg.get("model") or {})
    name = model.pop("name", "?")
    lines = [f"- model: `{name}` " + ", ".join(f"{k}={v}" for k, v in model.items() if v is not None)]
    flow = cfg.get("flow") or {}
    if flow:
        parts = [f"{k} `{json.dumps(v) if isinstance(v, (dict, list)) else v}`" for k, v in flow.items()
                 if k in ("objective", "path", "time_dist", "loss", "coupling", "cond_dropout")]
        lines.append("- flow objective: " + ", ".join(parts))
    train = cfg.get("train") or {}
    if train:
        done = "" if info.step is None else (f", stopped at step {info.step} (unfinished)" if info.unfinished
                                              else ", finished")
        ema = (f"EMA {train.get('ema_decay')}" + (" with warm-up" if train.get("ema_warmup") else "")
               if train.get("ema_decay") else "no EMA")
        lines.append(f"- training: {train.get('steps')} steps{done}; batch {train.get('batch_size')}, AdamW lr "
                     f"{train.get('lr')} ({train.get('lr_schedule')}, warm-up {train.get('warmup')}), {ema}, "
                     f"gradient clip {train.get('grad_clip')}, seed {train.get('seed')}")
    for change in cfg.get("recipe_changes") or []:
        lines.append(f"- resumed at step {change.get('step')} with changes: {'; '.join(change.get('changes', []))}")
    return lines


def model_card(cfg: Mapping[str, Any], figures: Optional[Sequence[Mapping[str, Any]]] = None,
               repo_id: Optional[str] = None) -> str:
    """The model card (Markdown with YAML metadata) of a run's ``config.json`` and measured ``figures``."""
    info = RunInfo.from_config(cfg)
    data = cfg.get("data") or {}
    title = repo_id or f"straightflow {cfg.get('model', {}).get('name', 'model')} on {info.data_source or 'data'}"
    meta = {"library_name": "straightflow", "tags": TAGS}
    head = "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in meta.items()) + "---\n"
    from .data import is_generated

    if is_generated(info.data_source):
        split = f"samples drawn with seed {info.seed} (evaluation draws fresh ones from a disjoint seed)"
    else:
        split = {"train": "its training split (a fifth is held out for evaluation)",
                 None: "all of it (no held-out split recorded)"}.get(info.data_split, str(info.data_split))
    lines = [f"# {title}", "",
             f"A velocity model v(x, t) (t = 0 noise, t = 1 data) trained with straightflow "
             f"{cfg.get('straightflow_version', '')} on `{info.data_source or data.get('name', '?')}`.", "",
             "## Data", "",
             f"- source: `{info.data_source or data.get('name', '?')}`, trained on {split}",
             f"- one sample: shape {list(info.shape) if info.shape else '?'}"
             + (f", {info.num_classes} classes (class-conditional, null class for guidance)" if info.num_classes else ""),
             "", "## Recipe", "", *_recipe_lines(cfg), "", "## Measured", ""]
    if figures:
        ref = figures[0].get("reference")
        if ref:
            lines += [f"Scored against {ref}.", ""]
        lines += ["| solver | NFE | metric | samples | value | data-vs-data floor | ratio |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {f['solver']} | {f['nfe']} | {f['metric']} | {f.get('samples', '')} | {f['value']:.4g} | "
                  f"{f['floor']:.4g} | {f['ratio']:.2f}x |" for f in figures]
    else:
        lines += ["Not measured here (`straightflow publish RUN --nfe 8,100` adds the figures with their floors)."]
    shape = list(info.shape) if info.shape else [2]
    lines += ["", "## Use", "", "```python", "import straightflow as sf",
              f"model = sf.load({json.dumps(repo_id or 'path/to/this/directory')})",
              f"x = sf.sample(model, ({', '.join(str(v) for v in [16, *shape])}), solver=\"heun\", steps=8, seed=0).x",
              "```", ""]
    return head + "\n".join(lines)


if ModelHubMixin is not None:

    class FlowModel(ModelHubMixin, library_name="straightflow", tags=TAGS):
        """A straightflow velocity model with its run config, as a Hugging Face Hub directory.

        ``velocity``: a model built by :mod:`straightflow.models` (it carries ``model.config``);
        ``run_config``: its run's ``config.json`` (taken from ``velocity.run_config`` when it was
        loaded from a run); ``figures``: measured rows for the card (:func:`measure`).
        ``save_pretrained(dir)`` writes a run directory plus ``README.md``; ``from_pretrained(repo or
        dir)`` and ``push_to_hub(repo_id)`` come from :class:`huggingface_hub.ModelHubMixin`.
        """

        def __init__(self, velocity: nn.Module, run_config: Optional[Dict[str, Any]] = None,
                     figures: Optional[List[Dict[str, Any]]] = None) -> None:
            if not isinstance(velocity, nn.Module):
                raise TypeError(f"FlowModel wraps an nn.Module velocity model, got {type(velocity).__name__}")
            self.model = velocity
            cfg = run_config if run_config is not None else getattr(velocity, "run_config", None)
            self.run_config = {k: v for k, v in dict(cfg or {}).items() if k not in ("model", "straightflow_version")}
            self.figures = list(figures or [])

        @classmethod
        def from_run(cls, run: Union[str, Path], figures: Optional[List[Dict[str, Any]]] = None) -> "FlowModel":
            """The model of a run directory (or Hub repo id)."""
            return cls(checkpoint.load(run), figures=figures)

        def save_pretrained(self, save_directory: Union[str, Path], *, figures: Optional[List[Dict[str, Any]]] = None,
                            overwrite: bool = False, **kwargs: Any) -> Optional[str]:
            """Write ``save_directory`` (weights, ``config.json``, model card); ``figures`` replace the
            measured rows on the card. A folder that exists and is not empty is refused (its files would be
            kept beside the Hub directory, a ``README.md`` of its own would stand in for the card, and
            ``push_to_hub`` would upload them all) unless ``overwrite=True``, which replaces it as a whole:
            the new directory is written beside it and swapped in. Other arguments:
            :meth:`huggingface_hub.ModelHubMixin.save_pretrained`."""
            if figures is not None:
                self.figures = list(figures)
            target = Path(save_directory)
            old = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
            if target.exists() and not target.is_dir():
                raise ValueError(f"{target} is a file; a Hub directory needs a folder")
            if not old:
                return super().save_pretrained(target, **kwargs)
            if not overwrite:
                shown = ", ".join(old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
                raise ValueError(f"{target} is not empty ({shown}); a Hub directory is written into a new or empty "
                                 "folder, so pick another one or replace it with overwrite=True (--overwrite)")
            fresh = target.with_name(f".{target.name}.new-{os.getpid()}")
            trash = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(fresh, ignore_errors=True)
            try:
                result = super().save_pretrained(fresh, **kwargs)
                target.rename(trash)
                fresh.rename(target)
            finally:
                shutil.rmtree(fresh, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
            return result

        def _save_pretrained(self, save_directory: Path) -> None:
            checkpoint.save_model(save_directory, self.model, self.run_config)  # the card: generate_model_card

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], *, force_download: bool = False,
                            token: Any = None, cache_dir: Any = None, local_files_only: bool = False,
                            revision: Optional[str] = None, **model_kwargs: Any) -> "FlowModel":
            """A Hub repo id (from the local cache when it is there, see :func:`straightflow.checkpoint.resolve_run_dir`)
            or a directory; ``device=`` places the model."""
            directory = resolve_run_dir(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                        force_download=force_download, local_files_only=local_files_only, token=token)
            checkpoint.load_config(directory)  # a missing or broken directory: the same one line as straightflow.load
            return super().from_pretrained(directory, **model_kwargs)

        def generate_model_card(self, *args: Any, **kwargs: Any) -> "ModelCard":
            cfg = {**self.run_config, "model": dict(getattr(self.model, "config", {}) or {}),
                   "straightflow_version": checkpoint.straightflow_version()}
            return ModelCard(model_card(cfg, self.figures, repo_id=kwargs.get("repo_id")))

        def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
            """Create ``repo_id`` (if needed) and upload the directory, its card naming the repo."""
            card_kwargs = dict(kwargs.pop("model_card_kwargs", None) or {}, repo_id=repo_id)
            return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

        @classmethod
        def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Any, force_download: bool,
                             local_files_only: bool, token: Any, device: Any = "cpu", **_: Any) -> "FlowModel":
            return cls(checkpoint.load(model_id, device=device))  # model_id: the resolved directory

else:  # pragma: no cover - exercised only without huggingface_hub

    class FlowModel:  # type: ignore[no-redef]
        """Needs ``huggingface_hub`` (``pip install 'straightflow[hub]'``)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise hub_dependency_error()

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> "FlowModel":
            raise hub_dependency_error()

        from_run = from_pretrained
