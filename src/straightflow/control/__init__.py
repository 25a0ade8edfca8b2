"""Control without retraining: guidance, inversion/editing, inverse problems, inference-time scaling.

- :mod:`.guidance` — classifier-free guidance with schedules (constant, linear, cosine, interval);
- :mod:`.editing` — inversion, RF-Inversion controlled ODEs, class-swap editing;
- :mod:`.operators` — measurement operators (inpainting, super-resolution, deblurring);
- :mod:`.inverse` — FlowChef, DPS-style, FLAIR-like and PMRF restoration;
- :mod:`.scaling`, :mod:`.nrg`, :mod:`.rewards` — inference-time scaling against a reward (best-of-N, SMC, RBF, Flow-NRG);
- :mod:`.adjoint` — adjoint gradients through sampling (constant memory).
"""
from __future__ import annotations

from . import adjoint, editing, guidance, inverse, nrg, operators, rewards, scaling  # noqa: F401
from .adjoint import SoftLabelModel, odeint_adjoint, optimise_noise  # noqa: F401
from .editing import ControlledVelocity, class_swap_edit, rf_edit, rf_invert  # noqa: F401
from .guidance import GuidanceSchedule, ScheduledGuidance, make_guidance  # noqa: F401
from .inverse import PMRF, RestoreResult, dps, flair, flowchef, restore  # noqa: F401
from .operators import make_operator  # noqa: F401
from .rewards import parse_reward  # noqa: F401
from .scaling import SearchResult, best_of_n, rbf, search, smc  # noqa: F401
