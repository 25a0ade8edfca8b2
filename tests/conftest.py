import os
from pathlib import Path

import pytest
import torch

# One intra-op thread per test process: on a 2-core machine with two xdist workers (or anything
# else running) OpenMP threads oversubscribe the cores and small ops slow down by 10-100x.
torch.set_num_threads(int(os.environ.get("STRAIGHTFLOW_TEST_THREADS", "1")))

# Caches (the metric classifier) go to the checkout, not the user's home; shared by workers.
os.environ.setdefault("STRAIGHTFLOW_CACHE", str(Path(__file__).resolve().parent.parent / ".sf-cache"))


@pytest.fixture(scope="session")
def oracle():
    """The 2D Gaussian-mixture oracle field shared by the solver tests (exact velocity, float64)."""
    from straightflow.oracle import GaussianMixtureFlow

    return GaussianMixtureFlow.random(dim=2, n_components=4, seed=1)


@pytest.fixture(scope="session")
def noise():
    """256 fixed float64 source samples for the 2D oracle."""
    return torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture
def max_steps():
    """The smoke-test step cap as an explicit override: ``with max_steps(20): ...`` caps every training run
    started inside (:func:`straightflow.train.max_steps`); the library never reads it from the environment."""
    from straightflow.train import max_steps as cap

    return cap
