"""``straightflow publish RUN --out DIR [--repo org/name]``: a run as a Hugging Face Hub directory.

Writes DIR (weights, ``config.json``, a model card with the data, the recipe and the figures
measured on the run's held-out data beside their floors) and, with ``--repo``, pushes it to the Hub
(``huggingface_hub`` login or ``HF_TOKEN``). ``straightflow.load("org/name")`` reads it back.
"""
from __future__ import annotations

from pathlib import Path

from . import flags


def cmd_publish(a) -> int:
    from ..hub import FlowModel, measure  # huggingface_hub is imported only when publishing

    out, run = Path(a.out).resolve(), Path(a.run).resolve()
    if a.overwrite and (out == run or out in run.parents):
        raise ValueError(f"--out {a.out} holds the run {a.run} itself; --overwrite would replace it: publish into "
                         "another folder")
    model, _ = flags.load_run(a.run, device=flags.device(a))
    figures = measure(model, a.nfe, solver=a.solver, n=a.n, seed=a.seed) if a.nfe else []
    fm = FlowModel(model, figures=figures)
    fm.save_pretrained(a.out, overwrite=a.overwrite)
    print(f"Hub directory written to {a.out} ({', '.join(sorted(p.name for p in Path(a.out).iterdir()))})")
    if a.repo:
        url = fm.push_to_hub(a.repo, private=a.private or None)
        print(f"pushed to https://huggingface.co/{a.repo}: {url}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("publish", help="a run as a Hugging Face Hub directory (model card with measured figures); "
                       "--repo pushes it")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="directory to write (weights, config.json, README.md model card)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is not empty (without it a non-empty folder is refused)")
    p.add_argument("--repo", default=None, help="also push to this Hub repo (org/name; needs a login or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--nfe", type=flags.ints, default=[8, 100],
                   help="NFE values measured on held-out data for the card ('' to skip)")
    p.add_argument("--solver", default="euler", help="solver for the measured figures")
    p.add_argument("--n", type=flags.positive_int, default=2000, help="samples per figure (capped by the data)")
    flags.add_seed(p)
    flags.add_device(p)
    p.set_defaults(fn=cmd_publish)
