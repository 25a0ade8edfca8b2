"""Hugging Face Hub directories (item 9): save_pretrained / from_pretrained / push_to_hub through
huggingface_hub's ModelHubMixin, the generated model card, and ``sf.load("org/name")`` from the
local Hub cache. Offline: the cache is populated locally, the upload is intercepted."""
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")

import straightflow as sf  # noqa: E402
from straightflow.cli import main  # noqa: E402
from straightflow.io import load_tensors  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub") / "run"
    assert main(["train", "--data", "digits", "--steps", "3", "--batch-size", "8", "--base-channels", "8",
                 "--out", str(d), "--quiet"]) == 0
    return d


def _populate_cache(cache: Path, repo_id: str, files: Path, commit: str = "0" * 40) -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(files, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_save_pretrained_writes_a_run_directory_with_a_card(run, tmp_path):
    fm = sf.FlowModel.from_run(run)
    figures = sf.hub.measure(fm.model, nfes=(2,), n=100)
    fm.save_pretrained(tmp_path / "out", figures=figures)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: straightflow" in card and "`digits`" in card and "training split" in card
    assert "3 steps, finished" in card and "| euler | 2 | FD | " in card and "held-out items of digits" in card
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["data_source"] == "digits" and cfg["train"]["steps"] == 3 and cfg["model"]["name"] == "unet"
    back = sf.load(tmp_path / "out")   # a Hub directory is a run directory
    a, b = load_tensors(run / "model.safetensors"), load_tensors(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and back.num_classes == 10


def test_load_resolves_a_hub_repo_from_the_local_cache(run, tmp_path, monkeypatch):
    sf.FlowModel.from_run(run).save_pretrained(tmp_path / "files")
    cache = tmp_path / "hf" / "hub"
    _populate_cache(cache, "someone/digits-flow", tmp_path / "files")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    model = sf.load("someone/digits-flow")
    assert model.run_config["data_source"] == "digits"
    fm = sf.FlowModel.from_pretrained("someone/digits-flow")
    assert isinstance(fm.model, torch.nn.Module) and fm.run_config["data_source"] == "digits"
    x = sf.sample(model, (2, 1, 8, 8), steps=2, seed=0).x
    assert x.shape == (2, 1, 8, 8)
    with pytest.raises(sf.CheckpointError, match="not in the local cache"):
        sf.load("someone/not-there")
    # the command line takes the repo id wherever it takes a run
    assert main(["sample", "someone/digits-flow", "--n", "4", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0


def test_push_to_hub_uploads_the_directory(run, tmp_path, monkeypatch):
    """push_to_hub creates the repo and uploads one folder: weights, config and a card naming the repo."""
    import huggingface_hub

    seen = {}

    def create_repo(self, repo_id, **kw):
        seen["repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kw):
        seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        seen["card"] = (Path(folder_path) / "README.md").read_text()
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = sf.FlowModel.from_run(run).push_to_hub("someone/digits-flow")
    assert url.endswith("/commit/abc") and seen["repo"] == "someone/digits-flow"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert 'sf.load("someone/digits-flow")' in seen["card"]


def test_publish_command_writes_the_directory(run, tmp_path, capsys):
    assert main(["publish", str(run), "--out", str(tmp_path / "pub"), "--nfe", "1", "--n", "50"]) == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "| euler | 1 | FD | 50 |" in card and "floor" in card


def test_readme_hub_snippet_runs(run, tmp_path, monkeypatch):
    """The README's Hub example as written: the push is intercepted and 'uploads' into a local Hub
    cache, from which sf.load then reads the repo (offline)."""
    import re

    import huggingface_hub

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "push_to_hub" in c)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "runs" / "digits")
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        _populate_cache(cache, repo_id, Path(folder_path))
        return "ok"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    scope = {"sf": sf}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "hub" / "digits" / "README.md").is_file() and "| euler | 100 |" in (
        tmp_path / "hub" / "digits" / "README.md").read_text()
    assert scope["model"].run_config["data_source"] == "digits"


def test_publish_refuses_a_non_empty_folder_without_overwrite(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my own notes\n")
    (out / "notes.txt").write_text("keep me\n")
    assert main(["publish", str(run), "--out", str(out), "--nfe", ""]) == 2
    err = capsys.readouterr().err
    assert "is not empty (README.md, notes.txt)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]  # untouched
    assert (out / "README.md").read_text() == "my own notes\n"
    # --overwrite replaces the folder as a whole: the generated card, no foreign file left to upload
    assert main(["publish", str(run), "--out", str(out), "--nfe", "", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "straightflow" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".mine.*"))  # no temporary folder left behind
    # never the run itself
    assert main(["publish", str(run), "--out", str(run), "--nfe", "", "--overwrite"]) == 2
    assert "holds the run" in capsys.readouterr().err and (run / "config.json").is_file()


def test_from_pretrained_missing_directory_is_one_clear_error(tmp_path):
    from straightflow.io import CheckpointError

    with pytest.raises(CheckpointError, match="run directory not found"):
        sf.FlowModel.from_pretrained(str(tmp_path / "missing" / "dir"))
