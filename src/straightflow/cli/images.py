"""``straightflow latent`` (train a latent flow) and ``straightflow generate`` (batched sampling to files)."""
from __future__ import annotations

import json

from .. import checkpoint
from ..images.fast import available as fast_samplers, sample_to_files
from ..images.latent import FLOW_WARMUP, is_latent_run, load_latent, train_latent_flow
from . import flags

_DATA_HELP = "shapes32, digits, mnist, another data set name, or a path (.npz/.npy, IDX, image folder)"


def cmd_latent(a) -> int:
    if a.ae_steps < 1 or a.flow_steps < 1:
        raise ValueError(f"--ae-steps and --flow-steps must be >= 1, got {a.ae_steps} and {a.flow_steps}")
    settings = flags.train_settings(a, steps=a.flow_steps, warmup=FLOW_WARMUP)  # the latent flow stage's recipe
    res = train_latent_flow(
        a.data, a.out, a.ae_steps, a.flow_steps, model=a.model, conditional=not a.unconditional, width=a.width,
        depth=a.depth, ae_kwargs={"latent_channels": a.latent_channels, "base_channels": a.ae_channels},
        hflip=a.hflip, n=a.n, allow_recipe_change=a.allow_recipe_change, settings=settings)
    rec = res.flow.autoencoder.config
    print(f"latent flow written to {res.run_dir}: autoencoder {list(res.flow.sample_shape)} -> "
          f"{list(res.flow.latent_shape)} (recon PSNR {getattr(res.flow.autoencoder, 'recon', {}).get('psnr', float('nan')):.2f} dB, "
          f"latent scale {[round(v, 3) for v in rec['latent_scale']]}), flow final loss {res.flow_result.final_loss:.4f}; "
          f"{res.seconds['total']:.1f} s")
    return 0


def cmd_generate(a) -> int:
    dev = flags.device(a)
    model = load_latent(a.run, device=dev) if is_latent_run(a.run) else checkpoint.load(a.run, device=dev)
    summary = sample_to_files(model, a.n, a.out, batch=a.batch, solver=a.solver, steps=a.steps, grid=a.grid,
                              label=a.label, seed=a.seed, compile=a.compile, bf16=a.bf16, device=dev,
                              png=not a.no_png, progress=not a.quiet)
    print(json.dumps(summary, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("latent", help="train an autoencoder + a flow in its latent space (one run directory)")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--out", required=True, help="run directory (re-run to resume)")
    p.add_argument("--ae-steps", type=int, default=2000)
    p.add_argument("--flow-steps", type=int, default=5000)
    p.add_argument("--model", default="dit", choices=["dit", "unet"], help="latent velocity model")
    p.add_argument("--width", type=int, default=128, help="DiT hidden size / 2x UNet base channels")
    p.add_argument("--depth", type=int, default=4, help="DiT blocks")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--ae-channels", type=int, default=32)
    p.add_argument("--n", type=int, default=None, help="number of training images (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--hflip", action="store_true", help="mirror augmentation (only for mirror-invariant data)")
    p.add_argument("--unconditional", action="store_true")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="resume OUT even though the recipe differs from the saved one")
    flags.add_seed(p)
    flags.add_device(p)
    flags.add_quiet(p)
    flags.add_log(p)
    p.set_defaults(fn=cmd_latent)

    g = sub.add_parser("generate", help="sample a pixel or latent run to PNG files + samples.npz (batched, resumable)")
    g.add_argument("run", help="run directory (straightflow train or straightflow latent)")
    g.add_argument("--n", type=flags.positive_int, default=64, help="images to generate")
    g.add_argument("--out", required=True)
    g.add_argument("--batch", type=int, default=64)
    flags.add_solver(g, solver="euler", steps=16)
    g.add_argument("--label", type=int, default=None, help="class label (default: cycle through the classes)")
    flags.add_seed(g)
    g.add_argument("--compile", action="store_true",
                   help=f"torch.compile the velocity model (sync-free solvers: {', '.join(fast_samplers())})")
    g.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast (state stays fp32; "
                   f"sync-free solvers: {', '.join(fast_samplers())})")
    g.add_argument("--no-png", action="store_true", help="only write samples.npz")
    flags.add_device(g)
    flags.add_quiet(g)
    g.set_defaults(fn=cmd_generate)

