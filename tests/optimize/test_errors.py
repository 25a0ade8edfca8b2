"""Honest error bars (straightflow.optimize.errors): the prediction interval of a calibration's
held-out RMSE contains the RMSE a fresh batch of the same size gives, in at least 9 of 10 trials,
on a heavy-tailed field (a sharp Gaussian mixture, where rare samples near mode boundaries carry
most of the error); the paired comparison says which of two tables is better."""
import math

import pytest
import torch

import straightflow as sf
from straightflow.optimize import calibrate, error_stats, per_sample_sq_error, prob_better
from straightflow.oracle import GaussianMixtureFlow


def sharp_field():
    g = torch.Generator().manual_seed(5)
    means = 3.0 * torch.randn(8, 2, generator=g, dtype=torch.float64) / math.sqrt(2)
    stds = torch.exp(math.log(0.05) + math.log(10) * torch.rand(8, generator=g, dtype=torch.float64))
    return GaussianMixtureFlow(means, stds=stds)


def _errors(field, cal, n, seed):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = sf.sample(field, x, solver="dopri5", steps=1, rtol=1e-9, atol=1e-9).x
    return per_sample_sq_error(sf.sample(field, x.float(), solver=cal).x, ref)


@pytest.fixture(scope="module")
def field_and_table():
    f = sharp_field()
    xc = torch.randn(256, 2, generator=torch.Generator().manual_seed(11))
    xh = torch.randn(256, 2, generator=torch.Generator().manual_seed(12))
    return f, calibrate(f, "learned", "auto", 6, xc, holdout=xh, save=False, mode="ls")


def test_interval_contains_a_fresh_batch_rmse_in_9_of_10_trials(field_and_table):
    """Trial t: the interval from held-out batch t, the RMSE of fresh batch 40 + t (256 samples each,
    one table). The issue's target is 9 of 10; 40 trials check the same rate (>= 90 %) more tightly."""
    f, cal = field_and_table
    e = _errors(f, cal, 256 * 80, 7).reshape(80, 256)
    fresh = e.mean(1).sqrt()
    hits, widths = [], []
    for t in range(40):
        st = error_stats(e[t], seed=t)
        hits.append(st.lo <= float(fresh[40 + t]) <= st.hi)
        widths.append(st.rel_halfwidth)
    assert sum(hits[:10]) >= 9 and sum(hits) >= 36, hits
    assert all(math.isfinite(w) for w in widths) and sorted(widths)[20] < 2.0


def test_stats_fields_and_the_tail():
    e = torch.cat([torch.full((99,), 1e-4, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)])
    st = error_stats(e)
    assert st.n == 100 and st.rmse == pytest.approx(math.sqrt((99e-4 + 1.0) / 100))
    assert st.lo <= st.rmse <= st.hi
    assert st.p99 > 0.01  # the tail shows: the 99th percentile reaches the outlier side
    assert "fresh batch of 100" in st.describe()
    with pytest.raises(ValueError, match="no samples"):
        error_stats(torch.zeros(0))


def test_paired_comparison():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(500, generator=g, dtype=torch.float64)
    assert prob_better(0.5 * base, base) == 1.0
    assert prob_better(base, 0.5 * base) == 0.0
    noisy = base * (1 + 0.01 * torch.randn(500, generator=g, dtype=torch.float64))
    assert 0.0 < prob_better(noisy, base) < 1.0
    assert prob_better(torch.tensor([math.inf]), torch.tensor([1.0])) == 0.0
    with pytest.raises(ValueError, match="same samples"):
        prob_better(base, base[:3])


def test_a_calibration_reports_interval_tail_and_decision(field_and_table):
    _, cal = field_and_table
    st = cal.info["holdout_stats"]
    assert st["lo"] <= st["rmse"] <= st["hi"] and st["p99"] > 0 and st["n"] == 256
    assert 0.0 <= cal.info["p_better"] <= 1.0
    assert cal.info["fallback"] == (cal.info["p_better"] < 0.9)
