"""A training recipe as one frozen value: what data, which model, which objective, which settings.

:class:`Recipe` gathers the four parts of a run that ``straightflow train`` used to spell as a
flat list of keyword arguments at every layer:

- :class:`DataSpec` -- the data set name or file/folder, how many samples, an image resolution,
  whether its labels condition the model;
- :class:`ModelSpec` -- the default model's size (``"auto"``: MLP for vectors, UNet for images);
- :class:`Objective` -- the flow-matching objective: path, training-time distribution, loss,
  coupling (names or JSON config dicts, as :class:`~straightflow.flow.Flow` takes them) and the
  label dropout;
- :class:`~straightflow.train.TrainSettings` -- the optimiser, schedule, EMA, checkpoint, seed and
  device settings of the trainer.

It is built once (by the command line, :func:`straightflow.cli.flags.recipe`), passed whole
(:func:`straightflow.runs.train_recipe`), and stored in the run's ``config.json`` under
``"recipe"``: ``Recipe.from_dict(r.to_dict()) == r``, and :meth:`Recipe.from_config` also reads a
``config.json`` written before this section existed. Overrides are copies
(``dataclasses.replace`` / :meth:`Recipe.replace`); a smoke test's step cap is the explicit
override :meth:`Recipe.with_max_steps` (the trainer never reads the environment).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from .train import TrainSettings

__all__ = ["Recipe", "DataSpec", "ModelSpec", "Objective", "RECIPE_FORMAT"]

RECIPE_FORMAT = 1  # the "format" key of Recipe.to_dict()

Spec = Union[str, Dict[str, Any]]  # a registered name or a JSON config dict ({"name": ..., ...})


def _opt_int(name: str, v: Any, low: int = 1) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be None or an int >= {low}, got {v!r}")
    return int(v)


def _spec(name: str, v: Any) -> Spec:
    if isinstance(v, str) and v:
        return v
    if isinstance(v, Mapping) and isinstance(v.get("name"), str):
        return dict(v)
    config = getattr(v, "config", None)  # a path / loss / ... object: its JSON config rebuilds it
    if callable(config):
        return _spec(name, config())
    raise ValueError(f"{name} must be a registered name or a config dict with a 'name', got {v!r}")


def _unknown(what: str, d: Mapping[str, Any], cls) -> None:
    extra = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if extra:
        raise ValueError(f"unknown {what} field(s) {extra}; accepted: {[f.name for f in dataclasses.fields(cls)]}")


@dataclass(frozen=True)
class DataSpec:
    """The training data: ``source`` (a data set name such as ``"moons"``, or a file or folder),
    ``n`` samples (None: the data set's default), ``resolution`` (resize images; None: as stored),
    ``conditional`` (condition the model on the labels when the data has them)."""

    source: str
    n: Optional[int] = None
    resolution: Optional[int] = None
    conditional: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"data source must be a non-empty data set name or path, got {self.source!r}")
        object.__setattr__(self, "n", _opt_int("n", self.n))
        object.__setattr__(self, "resolution", _opt_int("resolution", self.resolution))
        if not isinstance(self.conditional, bool):
            raise ValueError(f"conditional must be True or False, got {self.conditional!r}")


@dataclass(frozen=True)
class ModelSpec:
    """The default model (:func:`straightflow.runs.default_model_config`): ``name`` ``"auto"`` (or the
    name it resolves to), MLP ``hidden``/``depth`` for vectors, UNet ``base_channels`` for images."""

    name: str = "auto"
    hidden: int = 256
    depth: int = 4
    base_channels: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model must be a model name or 'auto', got {self.name!r}")
        for k in ("hidden", "depth", "base_channels"):
            object.__setattr__(self, k, _opt_int(k, getattr(self, k)))
            if getattr(self, k) is None:
                raise ValueError(f"{k} must be an int >= 1, got None")


@dataclass(frozen=True)
class Objective:
    """The flow-matching objective: ``path``, ``time_dist``, ``loss``, ``coupling`` (registered names or
    config dicts) and ``cond_dropout`` (None: 0.1 for labelled data, else 0)."""

    path: Spec = "linear"
    time_dist: Spec = "uniform"
    loss: Spec = "mse"
    coupling: Spec = "independent"
    cond_dropout: Optional[float] = None

    def __post_init__(self) -> None:
        for k in ("path", "time_dist", "loss", "coupling"):
            object.__setattr__(self, k, _spec(k, getattr(self, k)))
        p = self.cond_dropout
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"cond_dropout must be None or a number in [0, 1), got {p!r}")
            object.__setattr__(self, "cond_dropout", float(p))


@dataclass(frozen=True)
class Recipe:
    """One training recipe: ``data``, ``train`` (:class:`~straightflow.train.TrainSettings`), ``model``,
    ``objective``. Frozen; change it with :meth:`replace` (or ``dataclasses.replace``)."""

    data: DataSpec
    train: TrainSettings
    model: ModelSpec = field(default_factory=ModelSpec)
    objective: Objective = field(default_factory=Objective)

    def __post_init__(self) -> None:
        for k, cls in (("data", DataSpec), ("train", TrainSettings), ("model", ModelSpec), ("objective", Objective)):
            if not isinstance(getattr(self, k), cls):
                raise TypeError(f"Recipe.{k} must be a {cls.__name__}, got {type(getattr(self, k)).__name__}")

    @property
    def steps(self) -> int:
        return self.train.steps

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with parts replaced (``recipe.replace(train=recipe.train.replace(lr=2e-3))``)."""
        return dataclasses.replace(self, **changes)

    def with_max_steps(self, max_steps: Optional[int]) -> "Recipe":
        """The smoke-test override: at most ``max_steps`` training steps (None: unchanged)."""
        return self if max_steps is None else self.replace(train=self.train.capped(max_steps))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (``config.json``'s ``"recipe"`` section)."""
        train = {f.name: getattr(self.train, f.name) for f in dataclasses.fields(TrainSettings)}
        train["betas"] = list(self.train.betas)
        return {"format": RECIPE_FORMAT, "data": dataclasses.asdict(self.data), "model": dataclasses.asdict(self.model),
                "objective": dataclasses.asdict(self.objective), "train": train}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        """Inverse of :meth:`to_dict`; unknown or missing fields are a ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a recipe must be a JSON object, got {type(d).__name__}")
        if d.get("format", RECIPE_FORMAT) != RECIPE_FORMAT:
            raise ValueError(f"recipe format {d.get('format')!r} is not supported (expected {RECIPE_FORMAT})")
        _unknown("recipe", {k: v for k, v in d.items() if k != "format"}, cls)
        for k in ("data", "train"):
            if k not in d:
                raise ValueError(f"a recipe needs a {k!r} section; got {sorted(d)}")
        parts: Dict[str, Any] = {}
        for k, part in (("data", DataSpec), ("model", ModelSpec), ("objective", Objective)):
            if k in d:
                _unknown(k, d[k], part)
                parts[k] = part(**d[k])
        _unknown("train", d["train"], TrainSettings)
        train = {k: (tuple(v) if k == "betas" else v) for k, v in d["train"].items()}
        return cls(train=TrainSettings(**train), **parts)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Recipe":
        """The recipe of a run's ``config.json``: its ``"recipe"`` section, or, for a run written before
        that section existed, the recipe rebuilt from ``data_source``, ``data_resolution``, ``"data"``,
        ``"model"``, ``"flow"`` and ``"train"`` (``n`` is not recorded there: None)."""
        if "recipe" in cfg:
            return cls.from_dict(cfg["recipe"])
        data, model, flow = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("flow") or {}
        source = cfg.get("data_source") or data.get("name")
        if not source or "train" not in cfg:
            raise ValueError("this config records no training recipe (no data_source/data name or no 'train' section)")
        spec = DataSpec(str(source), resolution=cfg.get("data_resolution"),
                        conditional=bool(model.get("num_classes")) or not data.get("labels", False))
        msize = {k: model[k] for k in ("hidden", "depth", "base_channels") if isinstance(model.get(k), int)}
        obj = {k: flow[k] for k in ("path", "time_dist", "loss", "coupling", "cond_dropout") if k in flow}
        return cls(data=spec, train=TrainSettings.from_config(cfg["train"], progress=False),
                   model=ModelSpec(str(model.get("name", "auto")), **msize), objective=Objective(**obj))
