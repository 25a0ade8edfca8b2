"""Tests for straightflow.data: toys, embedded image sets, loaders and their errors."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from straightflow import data as D
from straightflow.registry import UnknownNameError

TOY_NAMES = ["checkerboard", "moons", "8gaussians", "spirals", "rings", "gmm"]


# ----------------------------------------------------------------------------- toys


def test_toy_registry_lists_all():
    assert sorted(TOY_NAMES) == D.TOYS.names()


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_shape_scale_determinism(name):
    x = D.toy_2d(name, 4000, seed=0)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, D.toy_2d(name, 4000, seed=0))
    assert not torch.equal(x, D.toy_2d(name, 4000, seed=1))
    # spread comparable to N(0, I), everything inside [-4, 4]^2, roughly centred
    assert x.abs().max() <= 4.0
    std = x.std(0)
    assert (std > 0.5).all() and (std < 2.5).all(), std
    assert x.mean(0).abs().max() < 0.6


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_generator(name):
    a = D.toy_2d(name, 100, generator=torch.Generator().manual_seed(3))
    b = D.toy_2d(name, 100, generator=torch.Generator().manual_seed(3))
    c = D.toy_2d(name, 100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_toy_errors():
    with pytest.raises(UnknownNameError) as e:
        D.toy_2d("swissroll", 10)
    for name in TOY_NAMES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="positive integer"):
        D.toy_2d("moons", 0)


def test_gmm_params_match_samples():
    p = D.gmm_params()
    assert torch.isclose(p["weights"].sum(), torch.tensor(1.0, dtype=torch.float64))
    mean = (p["weights"][:, None] * p["means"]).sum(0)
    x = D.toy_2d("gmm", 50000, seed=0).double()
    assert torch.allclose(x.mean(0), mean, atol=0.05)
    # the mixture itself does not depend on the seed
    assert torch.allclose(D.toy_2d("gmm", 50000, seed=7).double().mean(0), mean, atol=0.05)


# ----------------------------------------------------------------------------- embedded images


def test_digits():
    ds = D.digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert ds.y.dtype == torch.long and set(ds.y.tolist()) == set(range(10))
    assert ds.num_classes == 10 and ds.is_image and ds.shape == (1, 8, 8) and len(ds) == 1797


@pytest.mark.parametrize("res,ch", [(8, 1), (16, 1), (16, 3), (32, 3), (20, 1)])
def test_shapes(res, ch):
    ds = D.shapes(250, resolution=res, channels=ch, seed=0)
    assert ds.x.shape == (250, ch, res, res) and ds.x.dtype == torch.float32
    assert ds.x.min() >= -1.0 and ds.x.max() <= 1.0
    assert ds.num_classes == len(D.SHAPE_CLASSES) >= 4
    assert ds.classes[:4] == ["circle", "square", "triangle", "cross"]
    counts = torch.bincount(ds.y, minlength=ds.num_classes)
    assert (counts == 250 // ds.num_classes).all()  # balanced
    # dark background: the corner pixels are mostly dark, every image has a bright shape
    assert ds.x.amax(dim=(1, 2, 3)).min() > 0.0
    assert ds.x[:, :, 0, 0].mean() < -0.7
    assert torch.equal(ds.x, D.shapes(250, res, ch, seed=0).x)
    assert not torch.equal(ds.x, D.shapes(250, res, ch, seed=1).x)


def test_shapes_errors():
    with pytest.raises(ValueError, match="resolution"):
        D.shapes(10, resolution=4)
    with pytest.raises(ValueError, match="channels"):
        D.shapes(10, channels=2)


# ----------------------------------------------------------------------------- Dataset


def test_dataset_validation_errors():
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 NaN and 1 Inf.*clean"):
        D.Dataset(x)
    with pytest.raises(ValueError, match="empty"):
        D.Dataset(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="one label per sample"):
        D.Dataset(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        D.Dataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="float"):
        D.Dataset(torch.zeros(4, 2, dtype=torch.long))


def test_dataset_split_subset():
    ds = D.Dataset(torch.arange(100.0)[:, None], torch.arange(100) % 4, name="a")
    assert ds.num_classes == 4
    tr, ho = ds.split(0.2, seed=0)
    assert len(tr) == 80 and len(ho) == 20
    assert sorted(torch.cat([tr.x, ho.x])[:, 0].tolist()) == list(range(100))
    tr2, ho2 = ds.split(0.2, seed=0)
    assert torch.equal(ho.x, ho2.x) and torch.equal(ho.y, ho2.y)
    assert not torch.equal(ho.x, ds.split(0.2, seed=1)[1].x)
    sub = ds.subset(10, seed=0)
    assert len(sub) == 10 and torch.equal(sub.x, ds.subset(10, seed=0).x)
    assert torch.equal(sub.y, sub.x[:, 0].long() % 4)
    with pytest.raises(ValueError):
        ds.split(1.5)
    with pytest.raises(ValueError):
        ds.subset(101)


# ----------------------------------------------------------------------------- .npz / .npy


def test_npz_uint8_nhw_with_labels(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 5, 7), dtype=np.uint8)
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
    np.savez(tmp_path / "a.npz", data=imgs, labels=np.array([0, 1, 2, 0, 1, 2]))
    ds = D.load_array(tmp_path / "a.npz")
    assert ds.x.shape == (6, 1, 5, 7)
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1)
    assert ds.y.tolist() == [0, 1, 2, 0, 1, 2] and ds.num_classes == 3


def test_npz_nhwc_and_keys(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", images=imgs, y=np.arange(4))
    ds = D.load_array(tmp_path / "b.npz")
    assert ds.x.shape == (4, 3, 6, 6)
    assert torch.allclose(ds.x[1, 2], torch.from_numpy(imgs[1, :, :, 2]).float() / 127.5 - 1)
    assert ds.y.tolist() == [0, 1, 2, 3]
    # explicit key / label_key
    np.savez(tmp_path / "c.npz", foo=imgs, lab=np.arange(4))
    with pytest.raises(ValueError, match="keys present: foo, lab"):
        D.load_array(tmp_path / "c.npz")
    ds = D.load_array(tmp_path / "c.npz", key="foo", label_key="lab")
    assert ds.x.shape == (4, 3, 6, 6) and ds.y is not None
    with pytest.raises(ValueError, match="not found"):
        D.load_array(tmp_path / "c.npz", key="bar")


def test_npz_float_vectors_and_nchw(tmp_path):
    v = np.random.default_rng(0).random((9, 3)).astype(np.float64)
    np.savez(tmp_path / "v.npz", x=v)
    ds = D.load_array(tmp_path / "v.npz")
    assert ds.x.shape == (9, 3) and ds.x.dtype == torch.float32 and ds.y is None
    assert torch.allclose(ds.x, torch.from_numpy(v).float())  # float kept as is
    nchw = np.zeros((2, 1, 4, 4), np.float32)
    np.save(tmp_path / "n.npy", nchw)
    assert D.load_array(tmp_path / "n.npy").x.shape == (2, 1, 4, 4)


def test_npy_and_bad_shapes(tmp_path):
    np.save(tmp_path / "g.npy", np.zeros((3, 8, 8), np.uint8))
    ds = D.load_array(tmp_path / "g.npy")
    assert ds.x.shape == (3, 1, 8, 8) and (ds.x == -1).all()
    np.save(tmp_path / "bad.npy", np.zeros((3, 8, 8, 2), np.float32))
    with pytest.raises(ValueError, match="accepted shapes"):
        D.load_array(tmp_path / "bad.npy")
    np.save(tmp_path / "bad1.npy", np.zeros((5,), np.float32))
    with pytest.raises(ValueError, match="accepted shapes"):
        D.load_array(tmp_path / "bad1.npy")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        D.load_array(tmp_path / "nan.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="empty"):
        D.load_array(tmp_path / "empty.npy")


def test_object_arrays_refused(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = {"a": 1}, [1, 2]
    np.save(tmp_path / "o.npy", obj, allow_pickle=True)
    with pytest.raises(ValueError, match="refuses pickles"):
        D.load_array(tmp_path / "o.npy")
    np.savez(tmp_path / "o.npz", data=obj)
    with pytest.raises(ValueError, match="refuses pickles"):
        D.load_array(tmp_path / "o.npz")


# ----------------------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(">u1" if code == 0x08 else arr.dtype).tobytes()


def test_idx_raw_and_gz_with_labels(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(imgs))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    ds = D.load_idx(tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte")
    assert ds.x.shape == (5, 1, 4, 3)
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1)
    assert ds.y.tolist() == [3, 1, 4, 1, 5] and ds.num_classes == 6
    (tmp_path / "imgs.gz").write_bytes(gzip.compress(_idx_bytes(imgs)))
    ds_gz = D.load_idx(tmp_path / "imgs.gz")
    assert torch.equal(ds_gz.x, ds.x) and ds_gz.y is None
    # load_dataset dispatches on names containing "idx" and on .gz
    assert torch.equal(D.load_dataset(tmp_path / "imgs.gz").x, ds.x)
    assert torch.equal(D.load_dataset(str(tmp_path / "train-images-idx3-ubyte")).x, ds.x)


def test_idx_bad_magic_and_truncated(tmp_path):
    good = _idx_bytes(np.zeros((2, 3, 3), np.uint8))
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="bad IDX magic"):
        D.load_idx(tmp_path / "bad.idx")
    (tmp_path / "trunc.idx").write_bytes(good[:-4])
    with pytest.raises(ValueError, match="truncated"):
        D.load_idx(tmp_path / "trunc.idx")
    (tmp_path / "trunc_head.idx").write_bytes(good[:6])
    with pytest.raises(ValueError, match="truncated"):
        D.load_idx(tmp_path / "trunc_head.idx")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(ValueError, match="truncated"):
        D.load_idx(tmp_path / "trunc.gz")
    (tmp_path / "ok.idx").write_bytes(good)
    (tmp_path / "lab.idx").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="one label per sample"):
        D.load_idx(tmp_path / "ok.idx", tmp_path / "lab.idx")
    with pytest.raises(ValueError, match="labels_path"):
        D.load_idx(tmp_path / "lab.idx")


# ----------------------------------------------------------------------------- image folders


def _png(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_classes(tmp_path):
    _png(tmp_path / "dog" / "a.png", (6, 6), (255, 0, 0))
    _png(tmp_path / "dog" / "b.png", (6, 6), (0, 255, 0))
    _png(tmp_path / "cat" / "c.png", (6, 6), (0, 0, 255))
    (tmp_path / "empty").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = D.load_image_folder(tmp_path)
    assert ds.x.shape == (3, 3, 6, 6)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.y.tolist() == [0, 1, 1]
    assert torch.allclose(ds.x[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # cat = blue
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    ds8 = D.load_image_folder(tmp_path, resolution=8, channels=1)
    assert ds8.x.shape == (3, 1, 8, 8)
    via = D.load_dataset(tmp_path, resolution=4)
    assert via.x.shape == (3, 3, 4, 4) and via.classes == ["cat", "dog"]


def test_image_folder_flat_gray_and_mixed_sizes(tmp_path):
    _png(tmp_path / "a.png", (5, 5), 128, mode="L")
    _png(tmp_path / "b.png", (5, 5), 0, mode="L")
    ds = D.load_image_folder(tmp_path)
    assert ds.x.shape == (2, 1, 5, 5) and ds.y is None
    _png(tmp_path / "c.png", (7, 5), 255, mode="L")
    with pytest.raises(ValueError, match="different sizes.*resolution"):
        D.load_image_folder(tmp_path)
    assert D.load_image_folder(tmp_path, resolution=(4, 6)).x.shape == (3, 1, 4, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        D.load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        D.load_image_folder(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        D.load_image_folder(tmp_path)


# ----------------------------------------------------------------------------- load_dataset


def test_load_dataset_names():
    assert set(TOY_NAMES + ["digits", "shapes", "shapes32", "mnist"]) <= set(D.available())
    ds = D.load_dataset("moons", n=300, seed=2)
    assert ds.x.shape == (300, 2) and torch.equal(ds.x, D.toy_2d("moons", 300, seed=2))
    assert len(D.load_dataset("checkerboard")) == 20000
    assert D.load_dataset("shapes", n=20).x.shape == (20, 1, 16, 16)
    assert D.load_dataset("shapes32", n=20).x.shape == (20, 3, 32, 32)
    d = D.load_dataset("digits", n=100, seed=0, resolution=16)
    assert d.x.shape == (100, 1, 16, 16) and d.x.abs().max() <= 1.0
    with pytest.raises(ValueError, match="applies to image data only"):
        D.load_dataset("moons", resolution=8)


def test_load_dataset_unknown_and_files(tmp_path):
    with pytest.raises(UnknownNameError) as e:
        D.load_dataset("cifar10")
    msg = str(e.value)
    for name in ["checkerboard", "digits", "shapes32", "mnist"]:
        assert name in msg
    assert ".npz" in msg and "IDX" in msg and "folder" in msg
    with pytest.raises(FileNotFoundError):
        D.load_dataset(tmp_path / "nope.npz")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="accepted"):
        D.load_dataset(tmp_path / "a.csv")
    np.save(tmp_path / "v.npy", np.ones((10, 4), np.float32))
    assert D.load_dataset(str(tmp_path / "v.npy"), n=5).x.shape == (5, 4)


# ----------------------------------------------------------------------------- MNIST


@pytest.mark.mnist
@pytest.mark.skipif(D.mnist_path() is None,
                    reason="mnist_test_10k.npz not found (set STRAIGHTFLOW_DATA or provide ../shared/data)")
def test_mnist():
    ds = D.mnist()
    assert ds.x.shape == (10000, 1, 28, 28) and ds.x.dtype == torch.float32
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert ds.name == "mnist"


def test_mnist_missing_path(tmp_path):
    assert D.mnist_path(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="mnist_test_10k.npz"):
        D.mnist(tmp_path)


def test_mnist_path_env(tmp_path, monkeypatch):
    np.savez(tmp_path / "mnist_test_10k.npz", data=np.zeros((3, 28, 28), np.uint8))
    monkeypatch.setenv("STRAIGHTFLOW_DATA", str(tmp_path))
    assert D.mnist_path() == tmp_path / "mnist_test_10k.npz"
    ds = D.mnist()
    assert ds.x.shape == (3, 1, 28, 28) and ds.name == "mnist"
