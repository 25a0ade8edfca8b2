"""Shared helpers of the research scripts (not library code): fields, references, peers."""
from __future__ import annotations


import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from straightflow.oracle import GaussianMixtureFlow
from straightflow.solvers import sample

torch.set_num_threads(1)


def rmse(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def noise(shape, seed: int, dtype=torch.float64) -> Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64).to(dtype)


@torch.no_grad()
def reference(model64: Callable, x: Tensor, cond=None, tol: float = 1e-8) -> Tensor:
    """float64 dopri5 endpoint at rtol = atol = tol."""
    return sample(model64, x.double(), solver="dopri5", steps=1, cond=cond, rtol=tol, atol=tol).x


class Count:
    def __init__(self, model, cond=None):
        self.model, self.cond, self.n = model, dict(cond or {}), 0

    def __call__(self, x, t):
        self.n += 1
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        return self.model(x, t.expand(x.shape[0]) if t.numel() == 1 else t, **self.cond)


@torch.no_grad()
def diffusers_unipc(vel: Callable, x: Tensor, sigmas: Optional[Sequence[float]] = None, steps: Optional[int] = None,
                    order: int = 2, variant: str = "bh2", **cfg) -> Tensor:
    """diffusers' UniPCMultistepScheduler (flow prediction); ``sigmas`` (decreasing, with the end)
    replaces the shipped ones (kept in float32 as diffusers does), else ``steps`` shipped sigmas."""
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                  solver_order=order, solver_type=variant, **cfg)
    if sigmas is None:
        sch.set_timesteps(steps)
    else:
        s = torch.as_tensor(list(sigmas), dtype=torch.float64)
        sch.set_timesteps(len(s) - 1)
        sch.sigmas = s.to(torch.float32)
        sch.timesteps = (s[:-1] * 1000).round().long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in sch.timesteps:
            i = 0 if sch.step_index is None else sch.step_index
            sg = float(sch.sigmas[i])
            x = sch.step(-vel(x, 1.0 - sg), t, x, return_dict=False)[0]
    return x


def diffusers_unipc_sigmas(steps: int) -> List[float]:
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    sch.set_timesteps(steps)
    return [float(v) for v in sch.sigmas]


def oracle(dim: int, seed: int = 0) -> GaussianMixtureFlow:
    return GaussianMixtureFlow.random(dim, 8, seed=seed)
