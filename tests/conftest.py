import os
from pathlib import Path

import pytest
import torch

# Two pytest-xdist workers share the 2 cores: one intra-op thread each keeps them from fighting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Caches (the metric classifier) go to the checkout, not the user's home; shared by workers.
os.environ.setdefault("STRAIGHTFLOW_CACHE", str(Path(__file__).resolve().parent.parent / ".sf-cache"))
