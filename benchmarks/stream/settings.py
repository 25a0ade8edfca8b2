"""The streaming suite's fixed settings: its sections and the large model of the cost section."""
from __future__ import annotations

from typing import Any, Dict

SECTIONS = ("batch", "rcfg", "filter", "motion", "load", "cost", "page")
# compute-bound model for the cost section: 32x32 RGB (the shapes data), 5 classes (shapes), ~5.6M parameters
LARGE_SPEC: Dict[str, Any] = {"in_channels": 3, "resolution": 32, "base_channels": 96, "channel_mults": (1, 2, 2),
                              "num_classes": 5}
LARGE_SPEC_QUICK: Dict[str, Any] = {**LARGE_SPEC, "base_channels": 32}
COST_ROWS = (1, 2, 3, 4, 5, 8)  # covers n, n + 1 and 2n for n = 1, 2, 4

