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


def test_readme_command_lines_parse():
    """Every `straightflow ...` line of the README's command block is accepted by the CLI parser."""
    import shlex

    from straightflow.bench import SUITES
    from straightflow.bench.harness import parser as suite_parser
    from straightflow.cli import build_parser

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"## Command line\n\n```bash\n(.*?)```", text, re.S).group(1)
    lines = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.startswith("straightflow ")]
    assert len(lines) >= 10
    parser = build_parser()
    for ln in lines:
        argv = [a for a in shlex.split(re.sub(r"\[[^\]]*\]", "", ln))[1:]]
        a, extra = parser.parse_known_args(argv)
        assert not extra, (ln, extra)
        if a.cmd == "bench":  # the suite's own options are checked by the suite's parser
            suite_parser(SUITES.get(a.suite)).parse_args(a.args)
