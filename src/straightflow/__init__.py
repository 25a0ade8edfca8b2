"""straightflow: rectified flow and flow matching — train, straighten, sample, control, measure.

>>> import straightflow as sf
>>> flow = sf.Flow(model, path="linear", time_dist="logit_normal", loss="pseudo_huber")
>>> run = sf.train(flow, data, steps=5000, out="runs/x")
>>> out = sf.sample(run.model, (64, 2), solver="midpoint", steps=8, seed=0)   # out.x, out.nfe
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import coupling, data, grids, interop, io, losses, metrics, models, nf, optimize, oracle, paths, registry, solvers  # noqa: F401  (nf registers the tarflow/starflow models)
from . import time as time_dists  # noqa: F401  (``sf.time`` would shadow the stdlib name in user code)
from .checkpoint import load, load_config, save_model  # noqa: F401
from .coupling import PairDataset  # noqa: F401
from .data import Dataset, load_dataset  # noqa: F401
from .flow import Flow  # noqa: F401
from .io import CheckpointError  # noqa: F401
from .oracle import GaussianMixtureFlow  # noqa: F401
from .paths import AffinePath, convert_velocity, get_path  # noqa: F401
from .solvers import SampleResult, invert, sample  # noqa: F401
from .train import Trainer, TrainResult, train  # noqa: F401

__all__ = [
    "Flow", "train", "Trainer", "TrainResult", "sample", "invert", "load", "save_model", "load_config",
    "SampleResult", "GaussianMixtureFlow", "Dataset", "PairDataset", "load_dataset", "get_path",
    "convert_velocity", "AffinePath", "CheckpointError",
]


def __getattr__(name: str):
    """``sf.straighten``, ``sf.control``, ``sf.stream``, ``sf.images``, ``sf.align``, ``sf.hub`` (and ``sf.FlowModel``,
    the Hugging Face Hub mixin): imported on first use (they pull in more of the library, and the
    optional dependencies, than sampling needs)."""
    import importlib

    if name in ("straighten", "control", "stream", "images", "align", "hub"):
        return importlib.import_module(f"{__name__}.{name}")
    if name == "FlowModel":
        return importlib.import_module(f"{__name__}.hub").FlowModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
