"""Loading data files: ``.npz``/``.npy`` arrays, MNIST IDX files, folders of images. Never a pickle.

- :func:`load_array`: ``.npz``/``.npy`` with ``allow_pickle=False`` always; an object
  (pickled) array is refused with :class:`~.dataset.DataError`, because loading one can execute
  arbitrary code.
- :func:`load_idx`: MNIST-style IDX (``00 00 <dtype> <ndim>`` header, big-endian dims),
  raw or gzip (detected by magic bytes).
- :func:`load_image_folder`: images directly in a folder (no labels) or in one subfolder per
  class.

Conversions: uint8 maps to ``[-1, 1]`` as ``x / 127.5 - 1``; float data is kept as it is;
layouts ``(N, D)``, ``(N, H, W)``, ``(N, H, W, C)``, ``(N, C, H, W)`` become ``(N, D)`` or
``(N, C, H, W)`` with ``C`` in ``{1, 3, 4}``.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..io import FilePath
from .dataset import Dataset, DataError


# ----------------------------------------------------------------------------- array conversion

_SHAPES_ACCEPTED = (
    "accepted shapes: (N, D) vectors, (N, H, W) gray images, (N, H, W, C) or (N, C, H, W) images "
    "with C in {1, 3, 4}"
)


def _to_float(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 127.5 - 1.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise DataError(
        f"{where}: data has dtype {arr.dtype}; accepted: uint8 (mapped to [-1, 1]) or float "
        "(kept as is)"
    )


def _to_layout(arr: np.ndarray, where: str) -> np.ndarray:
    """Bring an array to (N, D) or (N, C, H, W)."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        c_first, c_last = arr.shape[1] in (1, 3, 4), arr.shape[3] in (1, 3, 4)
        if c_first and c_last:  # ambiguous tiny images: prefer the reading with square images
            c_last = arr.shape[1] == arr.shape[2] and arr.shape[2] != arr.shape[3]
            c_first = not c_last
        if c_first:
            return arr
        if c_last:
            return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    raise DataError(f"{where}: array has shape {arr.shape}; {_SHAPES_ACCEPTED}")


def _labels(arr: np.ndarray, n: int, where: str) -> np.ndarray:
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{where}: labels have shape {arr.shape}; expected ({n},), one label per sample")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise DataError(f"{where}: labels have dtype {arr.dtype}; expected integer class indices")


def _make(arr: np.ndarray, labels: Optional[np.ndarray], name: str, where: str,
          label_where: Optional[str] = None) -> Dataset:
    if arr.ndim == 0 or arr.shape[0] == 0 or arr.size == 0:
        raise DataError(f"{where}: the array is empty (shape {arr.shape})")
    x = _to_layout(_to_float(arr, where), where)
    y = None if labels is None else torch.from_numpy(_labels(labels, x.shape[0], label_where or where))
    return Dataset(torch.from_numpy(np.ascontiguousarray(x)), y, None, name)


# ----------------------------------------------------------------------------- .npz / .npy

_NPZ_DATA_KEYS = ("data", "x", "images", "arr_0")
_NPZ_LABEL_KEYS = ("labels", "y")


def _refuse_pickle(path: Path, e: Exception) -> DataError:
    return DataError(
        f"{path}: holds an object (pickled) array; straightflow refuses pickles because loading one "
        f"can execute arbitrary code. Save plain numeric arrays (uint8 or float) instead ({e})"
    )


def load_array(path: FilePath, key: Optional[str] = None, label_key: Optional[str] = None) -> Dataset:
    """Load a ``.npz``/``.npy`` file (``allow_pickle=False`` always) as a Dataset.

    uint8 maps to [-1, 1] (``x / 127.5 - 1``); float arrays are kept as they are (data in
    [0, 1] stays in [0, 1]). Layouts: (N, D) kept, (N, H, W) -> (N, 1, H, W), (N, H, W, C)
    -> channels-first, (N, C, H, W) kept (C in {1, 3, 4}). For .npz the data key defaults to the
    first of ``data, x, images, arr_0``; labels come from ``label_key`` or ``labels``/``y``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise DataError(f"{path}: load_array reads .npz or .npy files, got {suffix or 'no suffix'!r}")
    try:
        if suffix == ".npy":
            if key is not None or label_key is not None:
                raise DataError(f"{path}: key/label_key apply to .npz archives only; a .npy holds one array")
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise _refuse_pickle(path, e) from e
                raise DataError(f"{path}: not a valid .npy file ({e})") from e
            return _make(arr, None, path.stem, str(path))
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if key is None:
                key = next((k for k in _NPZ_DATA_KEYS if k in keys), None)
                if key is None:
                    raise DataError(
                        f"{path}: no data key found; looked for {', '.join(_NPZ_DATA_KEYS)}; keys present: "
                        f"{', '.join(keys) or '(none)'}; pass key=..."
                    )
            elif key not in keys:
                raise DataError(f"{path}: key {key!r} not found; keys present: {', '.join(keys) or '(none)'}")
            if label_key is None:
                label_key = next((k for k in _NPZ_LABEL_KEYS if k in keys and k != key), None)
            elif label_key not in keys:
                raise DataError(
                    f"{path}: label_key {label_key!r} not found; keys present: {', '.join(keys)}"
                )
            try:
                arr = z[key]
                lab = None if label_key is None else z[label_key]
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise _refuse_pickle(path, e) from e
                raise DataError(f"{path}: cannot read array {key!r} ({e})") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid {suffix} file or it is truncated ({e})") from e
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a valid {suffix} file ({e})") from e
    return _make(arr, lab, path.stem, f"{path}[{key}]")


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: gzip stream is corrupt or truncated ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes; the header alone is at least 4)")
    z0, z1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if z0 != 0 or z1 != 0 or code not in _IDX_DTYPES or ndim < 1:
        raise DataError(
            f"{path}: bad IDX magic {raw[:4].hex(' ')}; expected 00 00 <dtype> <ndim> with dtype in "
            "08 (uint8), 09 (int8), 0b (int16), 0c (int32), 0d (float32), 0e (float64) and ndim >= 1"
        )
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {head} for {ndim} dims)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dt = np.dtype(_IDX_DTYPES[code])
    want = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    have = len(raw) - head
    if have != want:
        raise DataError(
            f"{path}: IDX size mismatch: header dims {tuple(dims)} need {want} payload bytes, file has "
            f"{have} ({'truncated' if have < want else 'trailing bytes'})"
        )
    arr = np.frombuffer(raw, dtype=dt, count=want // dt.itemsize, offset=head).reshape(dims)
    return arr.astype(dt.newbyteorder("="))


def load_idx(path: FilePath, labels_path: Optional[FilePath] = None) -> Dataset:
    """Load an MNIST-style IDX file (raw or gzip, detected by magic bytes), with optional labels.

    Images ``(N, H, W)`` uint8 become ``(N, 1, H, W)`` in [-1, 1]; other layouts as in load_array.
    """
    path = Path(path)
    arr = _read_idx(path)
    if arr.ndim == 1:
        raise DataError(f"{path}: a 1-D IDX file holds labels, not data; pass it as labels_path=")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)  # int8/int16/int32 payloads are kept as numbers
    lab = None if labels_path is None else _read_idx(Path(labels_path))
    name = path.name.split(".")[0]
    return _make(arr, lab, name, str(path), None if labels_path is None else str(labels_path))


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _images_in(d: Path) -> List[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(root: FilePath, resolution: Optional[Union[int, Tuple[int, int]]] = None,
                      channels: Optional[int] = None) -> Dataset:
    """Load images directly in ``root`` (no labels) or in class subfolders (labels = index of the
    sorted subfolder name; names in ``.classes``). ``resolution`` (int or (H, W)) resizes;
    without it all images must share one size. ``channels`` 1/3/4, default 1 if all are gray else 3.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow: imported on first use (only image folders need it)

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    loose = _images_in(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, _images_in(d)) for d in subdirs]
    groups = [(c, fs) for c, fs in groups if fs]
    exts = ", ".join(IMAGE_EXTENSIONS)
    if loose and groups:
        raise DataError(
            f"{root}: has images both directly inside it and in subfolders; use either a flat folder "
            "(no labels) or one subfolder per class"
        )
    if not loose and not groups:
        raise DataError(f"{root}: no images found (accepted extensions: {exts}) in it or its subfolders")
    if groups:
        classes = [c for c, _ in groups]
        files = [(f, i) for i, (_, fs) in enumerate(groups) for f in fs]
    else:
        classes = None
        files = [(f, -1) for f in loose]
    if channels is not None and channels not in (1, 3, 4):
        raise DataError(f"load_image_folder: channels must be 1, 3 or 4, got {channels!r}")
    size: Optional[Tuple[int, int]] = None  # PIL (W, H)
    if resolution is not None:
        if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool) and resolution >= 1:
            size = (int(resolution), int(resolution))
        elif isinstance(resolution, (tuple, list)) and len(resolution) == 2 and all(
                isinstance(v, (int, np.integer)) and v >= 1 for v in resolution):
            size = (int(resolution[1]), int(resolution[0]))
        else:
            raise DataError(f"load_image_folder: resolution must be a positive int or (H, W), got {resolution!r}")

    imgs = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                imgs.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: cannot read image ({e})") from e
    if channels is None:
        gray = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in imgs)
        channels = 1 if gray else 3
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    if size is None:
        sizes: Dict[Tuple[int, int], Path] = {}
        for (f, _), im in zip(files, imgs):
            sizes.setdefault(im.size, f)
        if len(sizes) > 1:
            shown = "; ".join(f"{w}x{h} (e.g. {p.name})" for (w, h), p in list(sizes.items())[:4])
            raise DataError(
                f"{root}: images have different sizes ({shown}); resize them to one size with resolution= (--resolution N on the command line)"
            )
    out = []
    for im in imgs:
        im = im.convert(mode)
        if size is not None and im.size != size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        a = np.asarray(im, dtype=np.uint8)
        out.append(a[:, :, None] if a.ndim == 2 else a)
    arr = np.stack(out).transpose(0, 3, 1, 2)
    x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    y = None if classes is None else torch.tensor([i for _, i in files], dtype=torch.long)
    return Dataset(x, y, None if classes is None else len(classes), root.name or str(root), classes)
