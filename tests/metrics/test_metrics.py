"""Tests for straightflow.metrics: closed forms, exact identities, classifier cache, floors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from straightflow import metrics as M
from straightflow.registry import UnknownNameError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- W2


def test_w2_gaussians_close_to_mean_distance():
    g = _gen(0)
    x = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    y = torch.randn(1000, 2, generator=g, dtype=torch.float64) + torch.tensor([3.0, 0.0], dtype=torch.float64)
    # W2(N(m1, I), N(m2, I)) = |m1 - m2| = 3; the empirical estimate is biased up slightly.
    assert M.w2(x, y) == pytest.approx(3.0, abs=0.1)


def test_w2_identity_and_translation_exact():
    g = _gen(1)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert M.w2(x, x) == 0.0
    # the identity plan is optimal between a set and its translate: W2 = |c| exactly
    assert M.w2(x, x + c) == pytest.approx(float(c.norm()), rel=1e-10)
    # images are flattened; numpy input works too
    img = torch.randn(50, 1, 4, 4, generator=g, dtype=torch.float64)
    assert M.w2(img.numpy(), (img + 0.5).numpy()) == pytest.approx(0.5 * 4, rel=1e-10)


def test_w2_subsampling_deterministic():
    g = _gen(2)
    x = torch.randn(400, 2, generator=g)
    y = torch.randn(400, 2, generator=g) + 1
    a = M.w2(x, y, max_n=100, seed=3)
    assert a == M.w2(x, y, max_n=100, seed=3)
    assert M.w2(x, x, max_n=100, seed=5) == 0.0  # same rows on both sides
    with pytest.raises(ValueError, match="dimensions"):
        M.w2(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        M.w2(torch.full((3, 2), float("nan")), x)


# ----------------------------------------------------------------------------- sliced W2, MMD


def test_sliced_w2():
    g = _gen(3)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    assert M.sliced_w2(x, x) == pytest.approx(0.0, abs=1e-12)
    small = M.sliced_w2(x, x + 0.5)
    big = M.sliced_w2(x, x + 1.0)
    assert 0 < small < big
    # a translation by c projects to theta.c; E[(theta.c)^2] = |c|^2 / D
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert M.sliced_w2(x, x + c, n_projections=512) == pytest.approx(float(c.norm()) / math.sqrt(5), rel=0.1)
    assert M.sliced_w2(x, x + 1.0, seed=7) == M.sliced_w2(x, x + 1.0, seed=7)


def test_mmd():
    g = _gen(4)
    a = torch.randn(500, 3, generator=g)
    b = torch.randn(500, 3, generator=g)
    same = M.mmd(a, b)
    assert abs(same) < 0.01
    assert abs(M.mmd(a, a)) < 0.02  # unbiased: -2 (k - mean offdiag k) / n, tiny
    shifted = M.mmd(a, b + 1.0)
    assert shifted > 0.3 and shifted > 20 * abs(same)
    assert M.mmd(a, b + 0.3) < shifted
    assert M.mmd(a, b + 1.0, bandwidths=[1.0]) > 0
    with pytest.raises(ValueError):
        M.mmd(a, b, bandwidths=[0.0])


# ----------------------------------------------------------------------------- straightness


def test_straightness_zero_for_straight_constant_speed_lines():
    g = _gen(5)
    x0 = torch.randn(16, 3, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(16, 3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.05, 0.3, 0.31, 0.7, 1.0], dtype=torch.float64)  # non-uniform grid
    traj = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1
    assert M.straightness(traj, t) == pytest.approx(0.0, abs=1e-20)
    # integrating 1 -> 0 (inversion) reads the same
    assert M.straightness(traj.flip(0), t.flip(0)) == pytest.approx(0.0, abs=1e-20)


def test_straightness_quarter_circle_closed_form():
    # x(t) = (cos(pi t / 2), sin(pi t / 2)): X1 - X0 = (-1, 1), |x'| = pi / 2,
    # S = int_0^1 |(-1, 1) - x'(t)|^2 dt = 2 + pi^2/4 - pi * int (sin + cos) = pi^2/4 - 2.
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    traj = torch.stack([torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)], -1)[:, None, :]
    traj = traj.expand(-1, 3, -1)  # batch of 3 identical curves
    assert M.straightness(traj, t) == pytest.approx(math.pi**2 / 4 - 2, rel=1e-5)


def test_straightness_straight_but_accelerating():
    # on a straight line at non-constant speed: x(t) = t^2 x1, S = int (1 - 2t)^2 dt |x1|^2 = |x1|^2 / 3
    x1 = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    traj = (t**2)[:, None, None] * x1
    assert M.straightness(traj, t) == pytest.approx(25.0 / 3.0, rel=1e-5)
    with pytest.raises(ValueError, match="monotone"):
        M.straightness(traj[:3], torch.tensor([0.0, 0.5, 0.5]))


# ----------------------------------------------------------------------------- PSNR, SSIM


def test_psnr():
    g = _gen(6)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    # constant error 0.1: MSE = 0.01, PSNR = 10 log10(4 / 0.01)
    assert M.psnr(x.double(), x.double() + 0.1) == pytest.approx(10 * math.log10(400.0), rel=1e-9)
    assert M.psnr(x, x) == float("inf")  # identical images: documented +inf
    assert M.psnr(x, x + 0.1, data_range=1.0) == pytest.approx(20.0, rel=1e-4)


def test_ssim():
    g = _gen(7)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1  # 8x8: window shrinks to 7
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    n = torch.randn(4, 1, 8, 8, generator=g)
    s1, s2 = M.ssim(x, x + 0.1 * n), M.ssim(x, x + 0.3 * n)
    assert 1.0 > s1 > s2
    big = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert M.ssim(big, big) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(big, big + 0.2 * torch.randn(2, 3, 32, 32, generator=g)) < 1.0
    # constant images a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly (variances vanish)
    a = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    b = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    c1 = (0.01 * 2.0) ** 2
    assert M.ssim(a, b) == pytest.approx((2 * 0.5 * 0.3 + c1) / (0.25 + 0.09 + c1), rel=1e-9)


# ----------------------------------------------------------------------------- Fréchet distance


def _with_moments(z: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Samples whose sample mean and (unbiased) covariance are exactly mean, diag(std^2)."""
    z = z - z.mean(0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    w = z @ np.linalg.inv(chol).T  # sample covariance exactly I
    return w * std + mean


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    m1, s1 = np.array([0.0, 1.0, -1.0]), np.sqrt(np.array([1.0, 2.0, 3.0]))
    m2, s2 = np.array([1.0, 1.0, 0.5]), np.sqrt(np.array([4.0, 1.0, 0.5]))
    a = _with_moments(rng.standard_normal((200, 3)), m1, s1)
    b = _with_moments(rng.standard_normal((300, 3)), m2, s2)
    # ||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), diagonal: sum (s1 - s2)^2
    expected = float(((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sfcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRAIGHTFLOW_CACHE", str(cache))
        M._MEMO.clear()
        before = M._TRAIN_CALLS
        model = M.feature_extractor("digits")  # trains (the shipped recipe)
        assert M._TRAIN_CALLS == before + 1
        yield model, cache, mp
    M._MEMO.clear()


def test_classifier_trains_and_caches(digits_model):
    model, cache, _ = digits_model
    path = cache / "classifiers" / f"digits-{M.RECIPE_VERSION}.safetensors"
    assert path.is_file() and M.classifier_cache_path("digits") == path
    info = M.io.load_json(path.with_suffix(".json"))
    assert info["held_out_accuracy"] > 0.9 and info["train_accuracy"] > 0.95
    # in-process memo: the same object
    assert M.feature_extractor("digits") is model
    # a fresh process (memo cleared) loads the file: no training, same weights
    M._MEMO.clear()
    before = M._TRAIN_CALLS
    again = M.feature_extractor("digits")
    assert M._TRAIN_CALLS == before
    assert not again.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # held-out accuracy reproduced from the loaded weights
    x, y = M.load_digits_images()
    _, ho = M._split(x.shape[0], 0)
    assert M._accuracy(again, x[ho], y[ho]) == pytest.approx(info["held_out_accuracy"])


def test_classifier_shapes(digits_model):
    model, _, _ = digits_model
    with torch.no_grad():
        assert model.features(torch.zeros(3, 1, 8, 8)).shape == (3, M.DigitClassifier.feature_dim)
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # any size >= 8
    with pytest.raises(ValueError):
        model.features(torch.zeros(2, 1, 4, 4))


def test_classifier_fd_small_for_real_large_for_noise(digits_model):
    model, _, _ = digits_model
    x, _ = M.load_digits_images()
    perm = torch.randperm(x.shape[0], generator=_gen(0))
    a, b = x[perm[:800]], x[perm[800:1600]]
    real = M.classifier_fd(a, b)  # by name: served from the memo
    noise = M.classifier_fd(a, torch.rand(800, 1, 8, 8, generator=_gen(1)) * 2 - 1, extractor=model)
    assert real < 0.05 * noise
    # flattened (N, 64) input is accepted
    assert M.classifier_fd(a.reshape(800, 64), b.reshape(800, 64), extractor=model) == pytest.approx(real)


def test_custom_extractor_and_corrupt_cache(digits_model):
    _, cache, _ = digits_model
    g = _gen(8)
    x = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(64) % 3
    m = M.feature_extractor("tiny", x=x, y=y, steps=3)
    assert m.head.out_features == 3
    path = cache / "classifiers" / f"tiny-{M.RECIPE_VERSION}.safetensors"
    assert path.is_file()
    path.write_bytes(b"\x00" * 5)  # truncated file: retrained with a warning, not a crash
    M._MEMO.clear()
    with pytest.warns(UserWarning, match="unusable classifier cache"):
        m2 = M.feature_extractor("tiny", x=x, y=y, steps=3)
    for v, v2 in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(v, v2)  # deterministic given the seed
    M._MEMO.clear()
    m3 = M.feature_extractor("tiny")  # by name alone: the cached custom classifier
    assert torch.equal(m3.head.weight, m.head.weight)
    with pytest.raises(ValueError):
        M.feature_extractor("../evil", x=x, y=y)
    with pytest.raises(ValueError, match="built-in"):
        M.feature_extractor("nope")


# ----------------------------------------------------------------------------- reports, floors


def test_metric_report():
    r = M.MetricReport("W2", 0.123, 0.045)
    assert r.ratio == pytest.approx(0.123 / 0.045)
    assert str(r) == "W2 = 0.123 (floor 0.045, 2.7x)"
    assert M.MetricReport("W2", 0.1, 0.0).ratio == float("inf")
    assert r.to_dict()["floor"] == 0.045


def test_evaluate_floor_and_ratio():
    g = _gen(9)
    data = torch.randn(1200, 2, generator=g)
    good = torch.randn(1000, 2, generator=g)
    bad = torch.randn(1000, 2, generator=g) + 1.0
    rg = M.evaluate(good, data, "w2")
    rb = M.evaluate(bad, data, "w2")
    assert rg.n == rb.n == 600  # min(n, len(data) // 2)
    assert rg.floor == rb.floor > 0  # same halves, same size
    assert 0.5 < rg.ratio < 2.0 and rb.ratio > 3.0
    assert rg.name == "W2" and "floor" in str(rg)
    assert M.evaluate(bad, data, "sw2").ratio > 3.0
    rm = M.evaluate(bad, data, "mmd")
    assert rm.value > 10 * abs(rm.floor)
    assert M.evaluate(good, data, "w2", seed=1).floor != rg.floor  # seeded split
    with pytest.raises(UnknownNameError, match="valid names"):
        M.evaluate(good, data, "nope")
    with pytest.raises(ValueError, match="paired metric"):
        M.evaluate(good, data, "psnr")


def test_evaluate_fd_uses_extractor(digits_model):
    model, _, _ = digits_model
    x, _ = M.load_digits_images()
    noise = torch.rand(400, 1, 8, 8, generator=_gen(2)) * 2 - 1
    r = M.evaluate(noise, x, "fd", extractor=model)
    assert r.n == 400 and r.ratio > 10


def test_registry():
    names = M.available()
    for n in ("w2", "sliced_w2", "mmd", "fd", "psnr", "ssim", "straightness"):
        assert n in names
    assert M.available("distribution") == ["fd", "mmd", "sliced_w2", "w2"]
    assert M.METRICS.canonical("SW2") == "sliced_w2"
