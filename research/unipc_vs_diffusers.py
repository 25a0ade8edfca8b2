"""UniPC: straightflow vs diffusers' UniPCMultistepScheduler (flow prediction) on the oracle.

Ratios ours / diffusers of the endpoint RMSE (float64 dopri5 reference at rtol = atol = 1e-8):
(1) same grid: diffusers' shipped flow sigmas (1 - 1e-6, ..., 0), orders 2 and 3, 4..30 steps;
(2) order 2 on a uniform grid that stops at t = 0.98 (diffusers given the same sigmas);
(3) each library's default grid (ours: uniform 0 -> 1; diffusers: shipped sigmas), bh2, NFE 3..10.
Run (before/after a change): cd research && PYTHONPATH=../src:. python unipc_vs_diffusers.py
"""
import sys

import torch

from _common import Count, diffusers_unipc, diffusers_unipc_sigmas, noise, oracle, reference, rmse
from straightflow.solvers import sample


def main():
    for dim, n in ((2, 1000), (64, 256)):
        o = oracle(dim)
        z = noise((n, dim), 0)
        ref = reference(o, z)
        print(f"# oracle {dim}D (GaussianMixtureFlow.random({dim}, 8, seed=0), n = {n})")
        print("(1) same grid (diffusers' shipped sigmas): RMSE ours, diffusers, ratio")
        for order in (2, 3):
            for steps in (4, 6, 8, 10, 15, 20, 30):
                sig = diffusers_unipc_sigmas(steps)
                g = 1 - torch.tensor(sig, dtype=torch.float64)
                ours = rmse(sample(o, z, solver="unipc", grid=g, order=order).x, ref)
                dif = rmse(diffusers_unipc(Count(o), z, sigmas=sig, order=order), ref)
                print(f"  order {order} steps {steps:3d}: {ours:.3e} {dif:.3e}  ratio {ours / dif:.2f}")
        print("(2) uniform grid stopping at t = 0.98, order 2 (reference: dopri5 to 0.98)")
        ref98 = sample(o, z, solver="dopri5", grid=torch.tensor([0.0, 0.98], dtype=torch.float64),
                       rtol=1e-8, atol=1e-8).x
        for steps in (5, 10, 15, 20, 30):
            g = torch.linspace(0, 0.98, steps + 1, dtype=torch.float64)
            g[0] = 1e-6  # diffusers cannot start at sigma = 1 exactly (log 0); both start here
            ours = rmse(sample(o, z, solver="unipc", grid=g).x, ref98)
            dif = rmse(diffusers_unipc(Count(o), z, sigmas=(1 - g).tolist()), ref98)
            print(f"  steps {steps:3d}: {ours:.3e} {dif:.3e}  ratio {ours / dif:.2f}")
        print("(3) default grids (ours: uniform; diffusers: shipped sigmas), bh2 order 2")
        for steps in range(3, 11):
            ours = rmse(sample(o, z, solver="unipc", steps=steps).x, ref)
            dif = rmse(diffusers_unipc(Count(o), z, steps=steps), ref)
            print(f"  NFE {steps:2d}: ours {ours:.3e}  diffusers {dif:.3e}  ratio {ours / dif:.3f}")


if __name__ == "__main__":
    sys.exit(main())
