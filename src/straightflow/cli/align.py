"""straightflow align and straightflow policy: align a run to a reward or preferences; flow policies.

    straightflow align RUN --method dpo --reward class:3 --out runs/aligned --steps 300 [--label 3]
                       [--reg R] [--lora-rank 4] [--preferences SAMPLES PAIRS] [--opt group=8 --opt sde_steps=10]
    straightflow policy --env Pendulum-v1 --out runs/pendulum --bc-steps 3000 --rollouts 30 --denoise-steps 4

The aligned run is a normal run directory (sample, eval and search accept it); rerunning the same
command after a kill resumes it. The --method names come from the alignment-method registry.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..align import align
from ..align.base import available
from ..align.policy import behaviour_clone, evaluate, reinflow_finetune
from ..checkpoint import load
from ..trainlog import LOG_KINDS
from . import flags

__all__ = ["register", "cmd_align", "cmd_policy"]


def _opts(pairs) -> dict:
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise ValueError(f"--opt takes key=value (e.g. group=8), got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def cmd_align(a) -> int:
    lora = {"r": a.lora_rank, "alpha": a.lora_alpha} if a.lora_rank else None
    prefs = tuple(a.preferences) if a.preferences else None
    settings = flags.train_settings(a, log_every=min(a.log_every, a.steps) if a.steps >= 1 else a.log_every)
    res = align(a.run, method=a.method, reward=a.reward, out=a.out, label=a.label, reg=a.reg, lora=lora,
                n_data=a.n_data, preferences=prefs, settings=settings, **_opts(a.opt))
    c = res.cost
    print(f"aligned {a.run} with {a.method}: {res.steps} steps, final loss {res.final_loss:.4g}; model calls "
          f"{c['forward'] + c['grad_forward']} (+{c['reference']} reference, {c['data_forward']} for the data), "
          f"{c['seconds']:.1f} CPU s; run written to {a.out}")
    return 0


def cmd_policy(a) -> int:
    out = Path(a.out)
    bc_dir = out / "bc"
    res, info = behaviour_clone(a.env, out=bc_dir, steps=a.bc_steps, episodes=a.episodes, seed=a.seed,
                                progress=not a.quiet, device=str(flags.device(a)), log=a.log)
    bc = load(bc_dir)
    before = evaluate(bc, a.env, episodes=a.eval_episodes, steps=a.denoise_steps)
    ft_dir = out / f"reinflow-k{a.denoise_steps}"
    ft = reinflow_finetune(bc_dir, out=ft_dir, rollouts=a.rollouts, denoise_steps=a.denoise_steps, seed=a.seed,
                           progress=not a.quiet, reg=a.reg, log=a.log)
    after = evaluate(ft.model, a.env, episodes=a.eval_episodes, steps=a.denoise_steps)
    print(f"{a.env}: expert (noisy execution) {info['expert_return']:.1f}; behaviour-cloned {before['mean']:.1f} "
          f"+- {before['std']:.1f}; ReinFlow-fine-tuned {after['mean']:.1f} +- {after['std']:.1f} "
          f"({a.denoise_steps} denoising steps, {a.eval_episodes} episodes); runs: {bc_dir}, {ft_dir}")
    return 0


def register(sub) -> None:
    """``align`` and ``policy``."""
    p = sub.add_parser("align", help="align a run to a reward or preference pairs (DPO, RWR, GRPO, ReinFlow, ...)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="base run directory")
    p.add_argument("--method", required=True, choices=available(), help="alignment method")
    p.add_argument("--reward", default=None,
                   help="class:C | class-heldout:C | ink[:THRESHOLD] | region:disc:cx,cy,r[:soft=T] | region:halfplane:...")
    p.add_argument("--preferences", nargs=2, metavar=("SAMPLES", "PAIRS"), default=None,
                   help="dpo/sft/rwr: your own samples.safetensors (x, id[, y, reward]) and pairs.jsonl "
                        "({id, chosen, rejected} per line) instead of pairs generated from --reward")
    p.add_argument("--out", required=True, help="aligned run directory (resumes if it holds a training state)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (the budget)")
    p.add_argument("--label", type=int, default=None, help="class the aligned generation is conditioned on "
                                                           "(default: the null class, i.e. unconditional)")
    p.add_argument("--reg", type=float, default=None, help="regularisation to the base model (method default if unset)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts (online) or pairs/samples (offline) per step")
    p.add_argument("--n-data", type=int, default=None, help="offline methods: generated pairs (default max(256, batch))")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the saved weights (0 = off)")
    p.add_argument("--lora-rank", type=int, default=0, help="train a LoRA adapter of this rank instead of all weights")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA scale numerator: the update is scaled by alpha / rank (default: the rank, i.e. scale 1)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. group=8, sde_steps=10, truncate=1, denoise_steps=2)")
    flags.add_seed(p)
    flags.add_device(p, default="cpu")
    flags.add_quiet(p)
    flags.add_log(p)
    p.set_defaults(fn=cmd_align)

    q = sub.add_parser("policy", help="flow policy: behaviour-clone a scripted expert, fine-tune with ReinFlow (gymnasium)")
    q.add_argument("--env", default="Pendulum-v1")
    q.add_argument("--out", default="runs/policy",
                   help="output folder: OUT/bc (behaviour cloning) and OUT/reinflow-kK (fine-tuned)")
    q.add_argument("--bc-steps", type=int, default=3000)
    q.add_argument("--episodes", type=int, default=30, help="expert episodes for behaviour cloning")
    q.add_argument("--rollouts", type=int, default=30, help="ReinFlow PPO rollouts (16 episodes each)")
    q.add_argument("--denoise-steps", type=int, default=4, help="denoising steps of the policy (1-4)")
    q.add_argument("--reg", type=float, default=0.0, help="KL coefficient to the behaviour-cloned policy")
    q.add_argument("--eval-episodes", type=int, default=20)
    flags.add_seed(q)
    flags.add_device(q, default="cpu", help_suffix="for behaviour cloning; ReinFlow rollouts and evaluation step "
                     "the environment on the CPU")
    flags.add_quiet(q)
    q.add_argument("--log", default="csv", choices=list(LOG_KINDS),
                   help="training logs in OUT/bc/logs and OUT/reinflow-kK/logs (see straightflow train --help)")
    q.set_defaults(fn=cmd_policy)
