"""The Python half of .ci/wheel_check.sh, run by the fresh venv's interpreter from outside the checkout.

It checks that ``straightflow`` is imported from the installed wheel (not from the checkout), that the
wheel carries its package data (the stream page, ``py.typed``, the model-card generator) and no
benchmarks, research or tests, and it runs the README's ten-line example, extracted the way
``tests/test_readme.py`` does, with training capped by ``straightflow.train.max_steps``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import zipfile
from importlib import resources
from pathlib import Path

# In the wheel: the streaming page served by `straightflow serve`, the typing marker, and the model card,
# which has no template file: `straightflow.hub.model_card` writes it (Markdown + YAML metadata).
PACKAGE_DATA = ("straightflow/stream/static/index.html", "straightflow/py.typed", "straightflow/hub.py")
NOT_IN_WHEEL = ("benchmarks/", "research/", "tests/", "docs/")


def fail(message: str) -> None:
    print(f"wheel check: {message}", file=sys.stderr)
    sys.exit(1)


def check_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    missing = [p for p in PACKAGE_DATA if p not in names]
    if missing:
        fail(f"{wheel.name} lacks its package data {missing}")
    stray = sorted({n.split("/")[0] + "/" for n in names if n.startswith(NOT_IN_WHEEL)})
    if stray:
        fail(f"{wheel.name} carries {stray}, which stay beside the package")
    print(f"wheel contents: {len(names)} files, package data {list(PACKAGE_DATA)} present, no {list(NOT_IN_WHEEL)}")


def check_installed(checkout: Path) -> None:
    import straightflow

    where = Path(straightflow.__file__).resolve()
    if checkout in where.parents:
        fail(f"straightflow was imported from the checkout ({where}), not from the installed wheel")
    if Path(sys.prefix).resolve() not in where.parents:
        fail(f"straightflow was imported from {where}, outside this venv ({sys.prefix})")
    page = resources.files("straightflow").joinpath("stream/static/index.html")
    if not page.is_file() or "websocket" not in page.read_text().lower():
        fail(f"the installed stream page {page} is missing or is not the websocket page")
    print(f"imported from {where.parent}; stream page installed ({len(page.read_text())} characters)")


def run_readme_example(readme: Path, steps: int) -> None:
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.DOTALL).group(1)
    if "sf.train(" not in code or "sf.sample(" not in code:
        fail("the README's first Python block is not the ten-line example (no sf.train / sf.sample)")
    # the module (``straightflow.train`` as an attribute is the function ``sf.train``)
    max_steps = importlib.import_module("straightflow.train").max_steps

    print(f"README ten-line example, training capped at {steps} steps:")
    with max_steps(steps):
        exec(compile(code, str(readme), "exec"), {})  # noqa: S102 (the README example, run as written)
    run = Path("runs/cb")
    cfg = json.loads((run / "config.json").read_text())
    if not (run / "model.safetensors").is_file() or cfg.get("step") != steps:
        fail(f"the example left no finished run in {run.resolve()} (step {cfg.get('step')}, wanted {steps})")

    from straightflow.hub import model_card

    card = model_card(cfg)
    if not card.startswith("---\n") or "library_name: \"straightflow\"" not in card or "## Recipe" not in card:
        fail("the model card generated from the example's run lacks its metadata or recipe:\n" + card[:400])
    print(f"run {run} at step {steps}; model card generated ({len(card.splitlines())} lines)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", type=Path, required=True)
    p.add_argument("--readme", type=Path, required=True)
    p.add_argument("--checkout", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    if a.checkout.resolve() in Path.cwd().resolve().parents or a.checkout.resolve() == Path.cwd().resolve():
        fail(f"run from outside the checkout (the working directory {Path.cwd()} is inside {a.checkout})")
    sys.path = [s for s in sys.path if s and Path(s).resolve() != a.checkout.resolve() / ".ci"]
    check_wheel_contents(a.wheel)
    check_installed(a.checkout.resolve())
    run_readme_example(a.readme, a.steps)


if __name__ == "__main__":
    main()
