"""The shape of one sample of a velocity model (``model.sample_shape``, or ``(model.dim,)``)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

__all__ = ["sample_shape"]


def sample_shape(model: Any, shape: Optional[Sequence[int]] = None, required: bool = True) -> Optional[Tuple[int, ...]]:
    """``shape`` when given, else ``model.sample_shape``, else ``(model.dim,)`` for an integer ``model.dim``.

    A shape that cannot be told raises a ValueError asking for ``shape=`` (``required=False``:
    returns None instead); a shape found must be a non-empty tuple of positive sizes.
    """
    if shape is not None:
        s = tuple(int(v) for v in shape)
    elif getattr(model, "sample_shape", None) is not None:
        s = tuple(int(v) for v in model.sample_shape)
    elif isinstance(getattr(model, "dim", None), int):
        s = (int(model.dim),)
    elif required:
        raise ValueError("cannot tell the sample shape of this model (no model.sample_shape / model.dim); pass shape=")
    else:
        return None
    if not s or any(v < 1 for v in s):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {s}")
    return s
