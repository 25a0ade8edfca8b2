"""Training a TarFlow with the library's trainer (EMA, atomic checkpoints, exact resume after a kill).

:class:`NFObjective` duck-types :class:`straightflow.flow.Flow` for :class:`straightflow.train.Trainer`:
its loss is the exact negative log-likelihood per dimension of noise-augmented data
(:meth:`TarFlow.loss`), with class labels replaced by the null class with probability
``cond_dropout`` (for classifier-free guidance). The run's ``config.json`` records
``flow = {"objective": "nll", ...}``, which marks a normalizing-flow run (:func:`is_nf_config`).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Mapping, Optional, Union

from torch import Tensor, nn

from ..checkpoint import unwrap
from ..data import Dataset, load_dataset
from ..models import build_model
from ..models.embed import drop_labels
from ..train import TrainResult, TrainSettings, train

__all__ = ["NF_OBJECTIVE", "NFObjective", "is_nf_config", "default_nf_config", "train_nf"]

NF_OBJECTIVE = "nll"


class NFObjective:
    """Exact maximum likelihood for a normalizing flow ``model`` (``model.loss(x, y, generator)``)."""

    def __init__(self, model: nn.Module, cond_dropout: float = 0.0) -> None:
        if not hasattr(model, "loss") or not hasattr(model, "log_prob"):
            raise TypeError(f"NFObjective needs a normalizing flow (TarFlow/STARFlow), got {type(model).__name__}")
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.model, self.cond_dropout = model, float(cond_dropout)
        self.coupling = SimpleNamespace(name="none", needs_pairs=False)

    def config(self) -> Dict[str, Any]:
        return {"objective": NF_OBJECTIVE, "cond_dropout": self.cond_dropout}

    def loss(self, x1: Tensor, cond=None, x0=None, generator=None, model=None) -> Tensor:
        m = unwrap(model if model is not None else self.model)
        y = None if not cond else cond.get("y")
        if y is not None and self.cond_dropout > 0:
            y = drop_labels(y, self.cond_dropout, m.null_class, generator=generator)
        return m.loss(x1, y, generator=generator)


def is_nf_config(cfg: Mapping[str, Any]) -> bool:
    """A run config of a normalizing flow (trained by :func:`train_nf`)."""
    return (cfg.get("flow") or {}).get("objective") == NF_OBJECTIVE


def default_nf_config(shape, num_classes: Optional[int], name: str = "tarflow", **overrides: Any) -> Dict[str, Any]:
    """A small TarFlow/STARFlow config for one sample of ``shape``: patch 2 for images (1 for vectors of
    length <= 64, else the smallest divisor giving <= 64 tokens), 4 blocks of 2 layers, width 64."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        p = 2 if shape[1] % 2 == 0 and shape[2] % 2 == 0 else 1
    else:
        p = next(d for d in range(1, shape[0] + 1) if shape[0] % d == 0 and shape[0] // d <= 64)
    cfg: Dict[str, Any] = {"name": name, "sample_shape": list(shape), "patch_size": p, "blocks": 4, "width": 64,
                           "layers": 2, "heads": 4, "num_classes": num_classes}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def train_nf(data: Union[str, Dataset], out: Optional[Union[str, Path]], model_config: Optional[Mapping[str, Any]] = None,
             settings: Optional[TrainSettings] = None, steps: Optional[int] = None, cond_dropout: Optional[float] = None,
             conditional: bool = True, n: Optional[int] = None, desc: str = "train nf", allow_recipe_change: bool = False,
             model_overrides: Optional[Mapping[str, Any]] = None, **options: Any) -> TrainResult:
    """Train a normalizing flow on ``data`` (a data set name, trained on its ``"train"`` split, or a
    :class:`Dataset`) into ``out``; resumes ``out`` when it holds a training state.

    ``model_config``: ``{"name": "tarflow", ...}`` (default :func:`default_nf_config` for the data, with
    ``model_overrides`` applied: ``blocks``, ``width``, ...; None values are ignored); ``cond_dropout``
    defaults to 0.1 for labelled data; ``settings``/``steps``/``options``: the trainer's settings.
    """
    extra: Dict[str, Any] = {}
    if isinstance(data, str):
        seed = (settings.seed if settings is not None else options.get("seed", 0)) or 0
        ds, source = load_dataset(data, n=n, seed=seed, split="train"), data
        extra["data_split"] = "train"
    elif isinstance(data, Dataset):
        ds, source = data, data.name
    else:
        raise TypeError(f"data must be a data set name or a straightflow Dataset, got {type(data).__name__}")
    num_classes = ds.num_classes if (conditional and ds.y is not None) else None
    cfg = dict(model_config) if model_config else default_nf_config(ds.shape, num_classes, **(model_overrides or {}))
    if "sample_shape" not in cfg:
        cfg["sample_shape"] = list(ds.shape)
    cfg.setdefault("num_classes", num_classes)
    if tuple(cfg["sample_shape"]) != tuple(ds.shape):
        raise ValueError(f"model sample_shape {tuple(cfg['sample_shape'])} does not match the data's {tuple(ds.shape)}")
    seed = settings.seed if settings is not None else int(options.get("seed", 0) or 0)
    model = build_model(cfg, seed=seed)
    if not model.num_classes:
        ds = Dataset(ds.x, name=ds.name)
    p = (0.1 if model.num_classes else 0.0) if cond_dropout is None else float(cond_dropout)
    return train(NFObjective(model, p), ds, steps=steps, out=out, settings=settings,
                 extra_config={"data_source": source, **extra}, desc=desc,
                 allow_recipe_change=allow_recipe_change, **options)
