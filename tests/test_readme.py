"""The README's ten-line example runs as written (with fewer training steps)."""
import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "sf.train(" in code and "sf.sample(" in code
    code = code.replace("steps=5000", "steps=20").replace('"runs/cb"', repr(str(tmp_path / "cb")))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "cb" / "model.safetensors").is_file()
