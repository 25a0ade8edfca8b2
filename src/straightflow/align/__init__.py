"""Align a flow to rewards and preferences: ``sf.align.align(base, method=..., reward=..., out=...)``.

One objective per method, all trained by :class:`straightflow.train.Trainer` through the shared
interface of :mod:`.base` (base model, reward or preference data, ``reg`` = regularisation to the base
model, ``steps`` = the budget) and saved as normal run directories:

- :mod:`.rwr` -- Flow-RWR (reward-weighted flow matching) and SFT on chosen samples (Liu et al. 2025);
- :mod:`.dpo` -- Flow-DPO on the flow-matching loss against a frozen reference (Liu et al. 2025);
- :mod:`.grpo` -- Flow-GRPO, group-relative policy gradient on the flow's SDE form (Liu et al. 2025);
- :mod:`.reinflow` -- ReinFlow, learnable injected noise at 1-4 steps (Zhang et al. 2025);
- :mod:`.adjoint_matching` -- Adjoint Matching with the memoryless schedule (Domingo-Enrich et al. 2025);
- :mod:`.draft` -- DRaFT-K, reward back-propagation through the sampler (Clark et al. 2024);
- :mod:`.policy` -- flow policies: behaviour cloning + ReinFlow/PPO on a gymnasium task;
- :mod:`.lora` -- LoRA adapters through ``peft`` for any ``nn.Module``;
- :mod:`.prefs` -- preference data files; :mod:`.sde` -- SDE forms with exact step likelihoods;
  :mod:`.rewards` -- extra rewards (stroke thickness, a held-out classifier).

Flow-NRG (reward guidance on noisy samples, inference time) lives beside the search methods in
:mod:`straightflow.control.nrg`.
"""
from __future__ import annotations

from . import adjoint_matching, dpo, draft, grpo, policy, prefs, reinflow, rwr, sde  # noqa: F401  (registers the methods)
from .base import (METHODS, AlignModule, AlignObjective, AlignResult, AlignTrainer, RewardError, align,  # noqa: F401
                   available, check_reward, export_policy)
from .prefs import Preferences, PreferenceError, generate_preferences, load_preferences, save_preferences  # noqa: F401

__all__ = ["align", "available", "METHODS", "AlignObjective", "AlignModule", "AlignTrainer", "AlignResult",
           "RewardError", "check_reward", "export_policy", "Preferences", "PreferenceError", "load_preferences",
           "save_preferences", "generate_preferences"]
