"""Self-sizing calibration: ``calibrate(model, "learned", "auto", nfe, save=False)`` on any callable with a
``dim`` grows its batches until the held-out RMSE is stable or its CPU budget is spent, and stops within
that budget; pinned batches stay possible; bad budgets get one-line errors; a stored file whose
coefficients were edited beyond sanity is refused on load."""
import json
import time

import pytest
import torch

import straightflow as sf
from straightflow.optimize import calibrate, calibration_path, load_calibration
from straightflow.optimize.learned import MAX_BATCH, PILOT_BATCH
from straightflow.oracle import GaussianMixtureFlow


@pytest.fixture(scope="module")
def field():
    return GaussianMixtureFlow.random(dim=2, n_components=4, seed=2)


def test_defaults_self_size_within_the_budget(field):
    t = time.process_time()
    cal = calibrate(field, "learned", "auto", 4, save=False, budget_s=6.0)
    spent = time.process_time() - t
    sz = cal.info["sizing"]
    assert sz["self_sized"] and sz["budget_s"] == 6.0
    assert spent <= 6.0 * 1.5 + 1.0, (spent, sz["history"])  # the pilot is always run; each growth is predicted
    ns = [h["n"] for h in sz["history"]]
    assert ns[0] == PILOT_BATCH and ns == sorted(ns) and sz["batch"] == ns[-1] <= MAX_BATCH
    assert cal.reference["calib_batch"] == cal.reference["holdout_batch"] == sz["batch"]
    assert sf.sample(field, torch.randn(16, 2), solver=cal).nfe == 4


def test_a_cheap_model_grows_past_the_pilot_and_stops_when_stable_or_at_the_budget(field):
    cal = calibrate(field, "learned", "auto", 6, save=False, budget_s=20.0, mode="ls")
    sz = cal.info["sizing"]
    st = cal.info["holdout_stats"]
    assert sz["batch"] >= 4 * PILOT_BATCH
    rel = (st["hi"] - st["lo"]) / (2 * st["rmse"])
    # it stopped because it is stable (and big enough), or because the next fit would not fit the budget
    assert (rel <= 0.10 and sz["batch"] >= 1024) or sz["batch"] == MAX_BATCH \
        or sz["cpu_seconds_total"] + 2.2 * sz["history"][-1]["cpu_s"] > 20.0


def test_pinned_batches_and_bad_budgets(field):
    x, xh = torch.randn(64, 2), torch.randn(64, 2)
    cal = calibrate(field, "learned", "auto", 4, x, holdout=xh, save=False, mode="ls")
    assert not cal.info["sizing"]["self_sized"] and cal.reference["calib_batch"] == 64
    with pytest.raises(ValueError, match="budget_s"):
        calibrate(field, "learned", "auto", 4, x, save=False, budget_s=5.0)
    with pytest.raises(ValueError, match="> 0"):
        calibrate(field, "learned", "auto", 4, save=False, budget_s=-1.0)


def test_a_conditional_model_self_sizes_with_a_label_sampler():
    class Labelled(torch.nn.Module):
        dim = 2

        def __init__(self):
            super().__init__()
            self.o = GaussianMixtureFlow.random(dim=2, n_components=2, seed=1)
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, y=None):
            return self.o(x, t) * (1.0 + 0.1 * y.to(x.dtype)[:, None]) * self.w

    m = Labelled()
    seen = []
    cal = calibrate(m, "learned", "auto", 4, save=False, budget_s=4.0, mode="ls",
                    cond=lambda n: seen.append(n) or {"y": torch.arange(n) % 2})
    assert seen and cal.info["sizing"]["self_sized"]
    with pytest.raises(ValueError, match="cond=lambda n"):
        calibrate(m, "learned", "auto", 4, save=False, budget_s=4.0, cond={"y": torch.zeros(8, dtype=torch.long)})


def test_a_table_edited_beyond_sanity_is_refused_on_load(field, tmp_path):
    x, xh = torch.randn(64, 2), torch.randn(64, 2)
    cal = calibrate(field, "learned", "auto", 4, x, holdout=xh, run_dir=tmp_path, mode="ls")
    p = calibration_path(tmp_path, "learned", "auto", 4)
    assert load_calibration(tmp_path, "learned", "auto", 4, model=field) is not None
    d = json.loads(p.read_text())
    d["table"]["b"][-1][0] = 1e6
    p.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="checksum"):  # any edit: the checksum no longer matches
        assert load_calibration(tmp_path, "learned", "auto", 4, model=field) is None
    del d["checksum"]  # a file without one (written before checksums): the sanity bound catches it
    p.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="outside the sane range"):
        assert load_calibration(tmp_path, "learned", "auto", 4, model=field) is None
    assert cal.nfe == 4
