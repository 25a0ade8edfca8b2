"""The three non-UniPC defects, measured on whichever source tree is first on PYTHONPATH
(the UniPC one: unipc_vs_diffusers.py). Before/after:
  rm -rf /tmp/sf_base && mkdir -p /tmp/sf_base && git archive <base> src | tar -x -C /tmp/sf_base
  PYTHONPATH=/tmp/sf_base/src python research/defects_before_after.py   # before
  PYTHONPATH=src python research/defects_before_after.py                # after
"""
import logging
import warnings

import torch

warnings.simplefilter("ignore")
logging.disable(logging.WARNING)

from diffusers import FlowMatchEulerDiscreteScheduler as FM  # noqa: E402

from straightflow.interop.diffusers import StraightflowScheduler as S  # noqa: E402
from straightflow.paths import get_path  # noqa: E402

fmt = lambda t: "[" + ", ".join(f"{float(v):.4f}" for v in t) + "]"  # noqa: E731

print("1. from_config(FlowMatchEuler(shift=3, shift_terminal=0.1, use_karras_sigmas=True).config), 6 steps")
fm = FM(shift=3.0, shift_terminal=0.1, use_karras_sigmas=True)
try:
    s = S.from_config(fm.config)
    s.set_timesteps(6)
    fm.set_timesteps(6)
    print("   straightflow sigmas", fmt(s.sigmas), "\n   FlowMatchEuler sigmas", fmt(fm.sigmas))
except Exception as e:
    print("   raised:", type(e).__name__, e)
for kw in ({"invert_sigmas": True}, {"stochastic_sampling": True}):
    try:
        s = S.from_config(FM(**kw).config)
        s.set_timesteps(4)
        print(f"   {kw}: accepted silently, config reports {s.config.get(list(kw)[0])}")
    except Exception as e:
        print(f"   {kw}: raised {type(e).__name__}: {str(e)[:90]}")

print("2. explicit timesteps [1000, 800, 500, 200] with shift = 3: what the model sees")
fm = FM(shift=3.0)
fm.set_timesteps(timesteps=[1000, 800, 500, 200])
s = S(shift=3.0)
s.set_timesteps(timesteps=[1000, 800, 500, 200])
print("   straightflow", fmt(s.timesteps), " FlowMatchEuler", fmt(fm.timesteps))
print("   grid='shifted' with grid_options shift=3 and shift=3:")
try:
    s = S(grid="shifted", shift=3.0, grid_options={"shift": 3.0})
    s.set_timesteps(4)
    one = S(shift=3.0)
    one.set_timesteps(4)
    print("   sigmas", fmt(s.sigmas), "vs shifted once", fmt(one.sigmas))
except Exception as e:
    print(f"   raised {type(e).__name__}: {str(e)[:100]}")

print("3. polynomial path n = 3: x0_to_x1(x0_hat = 0, x = alpha x1) / x1 (exact: 1)")
p = get_path("polynomial", n=3.0)
x1 = torch.ones(1, 2, dtype=torch.float64)
for t in (1e-5, 1e-4, 1e-3):
    tt = torch.full((1,), t, dtype=torch.float64)
    r = p.x0_to_x1(torch.zeros_like(x1), p.alpha(tt)[:, None] * x1, tt)
    x, u = p.interpolate(torch.zeros_like(x1), x1, tt)
    print(f"   t = {t:g}: x0_to_x1 ratio {float(r[0, 0]):.4g}; velocity_to_x1 ratio {float(p.velocity_to_x1(u, x, tt)[0, 0]):.4g}")
