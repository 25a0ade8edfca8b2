"""straightflow: rectified flow and flow matching — train, straighten, sample, control, measure."""
from __future__ import annotations

__version__ = "0.1.0"

from . import io, paths, registry  # noqa: F401
from .paths import AffinePath, get_path  # noqa: F401
