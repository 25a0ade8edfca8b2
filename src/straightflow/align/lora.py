"""Parameter-efficient alignment: LoRA adapters (Hu et al. 2022, "LoRA") on any ``nn.Module`` via ``peft``.

``apply_lora(model, r=4, alpha=None, target_modules=None, dropout=0.0)`` wraps a velocity model --
a straightflow MLP/UNet/DiT, or a diffusers transformer wrapped by
:class:`straightflow.interop.DiffusersVelocity` -- so that only the low-rank factors train:
``W x -> W x + (alpha / r) B A x`` on every targeted ``nn.Linear``/``nn.Conv2d`` (default: all of
them, found by type, so it works for networks peft knows nothing about). ``B`` starts at zero, so the
wrapped model *is* the base model at step 0; with the adapter disabled it is the base model at every
step, which is what the alignment objectives use as their frozen reference (no second copy in memory).

Storage (:func:`straightflow.align.align` writes both): ``model.safetensors`` holds the *merged* weights
``W + (alpha / r) B A`` under the base architecture, so every command and ``sf.load`` treat the run like
any other; ``adapter.safetensors`` holds the adapter alone (peft's key names) and ``config.json`` its
settings under ``align.lora``, so :func:`load_adapter` rebuilds base + adapter exactly (e.g. to keep
training, or to apply it to the base model on a GPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..io import load_json, load_tensors

__all__ = ["apply_lora", "adapter_state", "lora_config_of", "load_adapter", "default_targets", "trainable_fraction"]


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA needs peft: pip install 'straightflow[align]' (or pip install peft)") from e
    return peft


def default_targets(model: nn.Module, exclude: Sequence[str] = ()) -> List[str]:
    """Names of every ``nn.Linear`` / ``nn.Conv2d`` in ``model`` (minus names containing an ``exclude`` string)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    return [n for n in names if not any(e in n for e in exclude)]


def apply_lora(model: nn.Module, r: int = 4, alpha: Optional[float] = None,
               target_modules: Optional[Union[str, Sequence[str]]] = None, dropout: float = 0.0,
               exclude: Sequence[str] = ()) -> nn.Module:
    """``model`` wrapped with LoRA adapters of rank ``r`` (peft ``PeftModel``); base weights frozen.

    ``alpha`` defaults to ``r`` (scale 1). ``target_modules``: module names (or a peft pattern); default
    every Linear/Conv2d (:func:`default_targets`)."""
    peft = _peft()
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    if targets is None:
        targets = default_targets(model, exclude)
    if not targets:
        raise ValueError(f"no nn.Linear / nn.Conv2d modules to put LoRA adapters on in {type(model).__name__}")
    cfg = peft.LoraConfig(r=r, lora_alpha=float(alpha if alpha is not None else r), target_modules=targets,
                          lora_dropout=float(dropout))
    wrapped = peft.get_peft_model(model, cfg)
    wrapped._sf_lora = {"r": int(r), "alpha": float(alpha if alpha is not None else r),
                        "target_modules": list(targets) if isinstance(targets, list) else targets,
                        "dropout": float(dropout)}
    return wrapped


def lora_config_of(model: nn.Module) -> Dict[str, Any]:
    """The JSON settings :func:`apply_lora` used (what ``config.json`` stores under ``align.lora``)."""
    info = getattr(model, "_sf_lora", None)
    if info is None:
        cfg = model.peft_config["default"]
        info = {"r": int(cfg.r), "alpha": float(cfg.lora_alpha), "target_modules": sorted(cfg.target_modules),
                "dropout": float(cfg.lora_dropout)}
    return dict(info)


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors only (peft's names), detached and contiguous."""
    peft = _peft()
    return {k: v.detach().contiguous().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def load_adapter(run_dir: Union[str, Path], base: nn.Module) -> nn.Module:
    """``base`` wrapped with the LoRA adapter saved in ``run_dir`` (``adapter.safetensors`` + settings in
    ``config.json`` or ``align.json``); equals the merged model of the run."""
    peft = _peft()
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        cfg_file = run_dir / "align.json"
    cfg = load_json(cfg_file)
    info = (cfg.get("align") or {}).get("lora")
    if not info:
        raise ValueError(f"{cfg_file}: this run has no LoRA adapter (no align.lora entry)")
    model = apply_lora(base, r=int(info["r"]), alpha=info["alpha"], target_modules=info["target_modules"],
                       dropout=info.get("dropout", 0.0))
    state = load_tensors(run_dir / "adapter.safetensors")
    res = peft.set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{run_dir / 'adapter.safetensors'}: adapter is missing {len(missing)} tensors (e.g. {missing[0]})")
    return model


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters."""
    tot = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(1, tot)
