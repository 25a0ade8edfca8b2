"""Safe, atomic file I/O: safetensors for tensors, JSON for everything else. Never pickle.

Every write goes to a temporary file in the same directory, is flushed and fsynced, then
renamed over the target (``os.replace`` is atomic on POSIX), so a kill mid-write leaves either
the old file or the new one, never a torn file. Loading checks the file before parsing and
refuses pickle/zip archives (``torch.save`` output) outright: loading an untrusted checkpoint
must not execute code.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

FilePath = Union[str, os.PathLike]  # a filesystem path


def __getattr__(name: str) -> Any:
    if name == "PathLike":  # the old name, which also meant a probability path in straightflow.paths
        import warnings
        warnings.warn("straightflow.io.PathLike is deprecated; use straightflow.io.FilePath", DeprecationWarning,
                      stacklevel=2)
        return FilePath
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CheckpointError(ValueError):
    """A checkpoint or state file is missing, truncated, corrupt, or of a refused format."""


def atomic_write_bytes(path: FilePath, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + dir fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def save_json(path: FilePath, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: FilePath) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from e


def save_tensors(path: FilePath, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically (tensors are made contiguous)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save_bytes(flat, metadata=metadata))


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"


def _refuse_unsafe(path: Path, head: bytes) -> None:
    if head[:2] in _PICKLE_MAGIC or head[:4] == _ZIP_MAGIC:
        raise CheckpointError(
            f"{path}: this is a pickle/torch.save file; straightflow refuses to load pickles because "
            "loading one can execute arbitrary code. Convert it to safetensors in a trusted environment."
        )


def tensor_shapes(path: FilePath) -> Dict[str, tuple]:
    """Shapes of the tensors in a safetensors file, from its header alone (nothing else is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_unsafe(path, head)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({len(head)} bytes); not a safetensors file")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header says {n} bytes, "
                                  f"file has {size - 8})")
        try:
            header = json.loads(f.read(n))
            return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e


def load_tensors(path: FilePath, device: str | torch.device = "cpu") -> Dict[str, torch.Tensor]:
    """Load a safetensors file with clear errors for missing, truncated, corrupt or pickle files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    data = path.read_bytes()
    _refuse_unsafe(path, data[:8])
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes); not a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file (header says {header_len} bytes, "
            f"file has {len(data) - 8})"
        )
    try:
        out = st_load_bytes(data)
    except Exception as e:  # safetensors raises its own (version-dependent) error types
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
    if str(device) != "cpu":
        out = {k: v.to(device) for k, v in out.items()}
    return out
