"""The training recipe is one frozen value: built once, stored in config.json, passed whole; the smoke
cap is an explicit override, and nothing below the command line reads the environment for it."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from straightflow.checkpoint import load_config
from straightflow.recipe import DataSpec, ModelSpec, Objective, Recipe
from straightflow.runs import train_recipe, train_run
from straightflow.train import TrainSettings, max_steps, max_steps_cap

SRC = Path(__file__).resolve().parent.parent / "src" / "straightflow"
TINY = dict(n=200, hidden=16, depth=1, batch_size=32, warmup=1, progress=False)


def _recipe(**train):
    return Recipe(data=DataSpec("moons", n=200), train=TrainSettings(steps=train.pop("steps", 3), progress=False, **train),
                  model=ModelSpec(hidden=16, depth=1),
                  objective=Objective(path="linear", time_dist={"name": "logit_normal", "m": 0.0, "s": 1.0},
                                      loss="mse", cond_dropout=0.1))


def test_round_trip_through_json():
    r = _recipe(lr=2e-3, betas=(0.8, 0.99), lr_schedule="cosine", lr_decay_steps=10)
    d = json.loads(json.dumps(r.to_dict()))
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(Recipe(DataSpec("digits"), TrainSettings(steps=1)).to_dict()) == \
        Recipe(DataSpec("digits"), TrainSettings(steps=1))


def test_frozen_and_replace():
    r = _recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train = TrainSettings(steps=9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.data.source = "digits"
    r2 = dataclasses.replace(r, train=r.train.replace(lr=5e-3))
    assert r2.train.lr == 5e-3 and r.train.lr == 1e-3 and r2.data is r.data
    assert r.replace(model=ModelSpec(hidden=8)).model.hidden == 8


def test_max_steps_override():
    r = _recipe(steps=50)
    assert r.with_max_steps(None) is r
    assert r.with_max_steps(7).steps == 7 and r.steps == 50
    assert r.with_max_steps(500).steps == 50  # a cap never adds steps
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
            r.with_max_steps(bad)
    assert max_steps_cap() is None
    with max_steps(4):
        assert max_steps_cap() == 4
        with max_steps(None):
            assert max_steps_cap() is None
    assert max_steps_cap() is None


@pytest.mark.parametrize("make, match", [
    (lambda: TrainSettings(steps=-1), "steps must be an int >= 1"),
    (lambda: DataSpec("moons", n=-5), "n must be None or an int >= 1"),
    (lambda: DataSpec(""), "data source must be a non-empty"),
    (lambda: ModelSpec(hidden=0), "hidden must be"),
    (lambda: Objective(cond_dropout=1.5), "cond_dropout must be"),
    (lambda: Objective(path=3), "path must be a registered name"),
    (lambda: Recipe.from_dict({**_recipe().to_dict(), "extra": 1}), "unknown recipe field"),
    (lambda: Recipe.from_dict({**_recipe().to_dict(), "train": {"steps": 3, "lr_rate": 1}}), "unknown train field"),
    (lambda: Recipe.from_dict({"data": {"source": "moons"}}), "needs a 'train' section"),
])
def test_bad_values_are_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_recipe_is_stored_in_config_and_old_configs_load(tmp_path):
    r = _recipe()
    res = train_recipe(r, tmp_path / "run")
    cfg = load_config(tmp_path / "run")
    assert res.steps == 3 and cfg["recipe"] == json.loads(json.dumps(r.to_dict()))
    assert Recipe.from_config(cfg) == r
    old = {k: v for k, v in cfg.items() if k != "recipe"}  # a config.json written before the section existed
    rebuilt = Recipe.from_config(old)
    assert rebuilt.data.source == "moons" and rebuilt.model == dataclasses.replace(r.model, name="mlp")  # "auto", resolved
    assert rebuilt.train.replace(progress=r.train.progress) == r.train
    assert rebuilt.objective.time_dist == r.objective.time_dist and rebuilt.objective.cond_dropout == 0.1


def test_train_run_keywords_build_the_same_recipe(tmp_path):
    a = train_run("moons", tmp_path / "a", 3, seed=2, **TINY)
    b = train_recipe(Recipe(DataSpec("moons", n=200), TrainSettings(steps=3, seed=2, batch_size=32, warmup=1,
                                                                    progress=False), ModelSpec(hidden=16, depth=1)),
                     tmp_path / "b")
    assert load_config(tmp_path / "a")["recipe"] == load_config(tmp_path / "b")["recipe"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(sa[k].equal(sb[k]) for k in sa)


def test_scoped_cap_applies_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("STRAIGHTFLOW_MAX_STEPS", "1")  # ignored by the library: only cli/ reads it
    res = train_run("moons", tmp_path / "env", 3, **TINY)
    assert res.steps == 3
    with max_steps(2):
        res = train_run("moons", tmp_path / "cap", 5, **TINY)
    assert res.steps == 2 and load_config(tmp_path / "cap")["recipe"]["train"]["steps"] == 2


def test_cli_applies_the_cap_once_from_env_or_flag(tmp_path, monkeypatch, capsys):
    from straightflow.cli import main

    args = ["train", "--data", "moons", "--n", "200", "--hidden", "16", "--depth", "1", "--batch-size", "32",
            "--steps", "5", "--quiet"]
    monkeypatch.setenv("STRAIGHTFLOW_MAX_STEPS", "2")
    assert main([*args, "--out", str(tmp_path / "env")]) == 0
    err = capsys.readouterr().err
    assert err.count("smoke cap") == 1 and "at most 2 steps" in err
    assert load_config(tmp_path / "env")["step"] == 2
    monkeypatch.delenv("STRAIGHTFLOW_MAX_STEPS")
    assert main(["--max-steps", "1", *args, "--out", str(tmp_path / "flag")]) == 0
    assert load_config(tmp_path / "flag")["step"] == 1 and capsys.readouterr().err.count("smoke cap") == 1
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert "smoke cap" not in capsys.readouterr().err and load_config(tmp_path / "full")["step"] == 5
    monkeypatch.setenv("STRAIGHTFLOW_MAX_STEPS", "-4")
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "STRAIGHTFLOW_MAX_STEPS must be a positive integer" in capsys.readouterr().err


# where files live, not what is trained: these two may be read below the command line
LOCATION_VARS = {"STRAIGHTFLOW_CACHE", "STRAIGHTFLOW_DATA"}
_ENV_READ = re.compile(r"""(?:environ\s*(?:\.get\s*\(|\[)|getenv\s*\()\s*(?:["'](STRAIGHTFLOW_\w+)["']|(\w+))""")


def test_no_module_below_cli_reads_the_recipe_from_the_environment():
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC)
        if rel.parts[0] == "cli":
            continue
        text = p.read_text()
        for m in _ENV_READ.finditer(text):
            name, var = m.group(1), m.group(2)
            if (name and name not in LOCATION_VARS) or (var and "MAX_STEPS" in var):
                bad.append(f"{rel}: {m.group(0)}")
        if "MAX_STEPS_ENV" in text and re.search(r"(environ|getenv)[^\n]*MAX_STEPS_ENV", text):
            bad.append(f"{rel}: reads MAX_STEPS_ENV")
    assert not bad, bad
    assert _ENV_READ.search('os.environ.get("STRAIGHTFLOW_MAX_STEPS", "")')  # the check sees a read
    assert _ENV_READ.search("os.getenv(MAX_STEPS_ENV)").group(2) == "MAX_STEPS_ENV"
