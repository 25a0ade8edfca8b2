"""The shared interface of every alignment method: objective, container, trainer, one-call API.

An alignment method is an *objective* (:class:`AlignObjective`) trained by
:class:`straightflow.train.Trainer`, so checkpoints, EMA, the NaN guard, progress bars and
bit-exact resume after a kill come from the trainer. Every objective has

* ``model`` -- an :class:`AlignModule`: the velocity model being aligned (``policy``; possibly
  LoRA-wrapped by :mod:`.lora`), any extra trainable heads a method needs (ReinFlow's noise
  network, a PPO critic) and bookkeeping buffers (model-call counters; a PPO rollout buffer). Buffers
  live in the module's state dict, so the trainer's state file restores them on resume.
* a frozen ``reference`` -- the base model (a deep copy with ``requires_grad_(False)``, or, for a
  LoRA-wrapped model, the same network with its adapter disabled, which costs no memory);
* a ``reward`` (any :class:`~straightflow.control.rewards.Reward` or callable ``r(x) -> (B,)``) or
  preference data, checked before any training (:func:`check_reward`);
* ``reg`` -- the strength of the regularisation to the base model (each method says what it is:
  a KL coefficient, a DPO temperature, ``1 / lambda`` of a reward tilt ``p_base exp(lambda r)``);
* ``config()`` and ``loss(x1, cond=, x0=, generator=, model=)``: every random draw comes from
  ``generator`` (the trainer's), which is what makes a resumed run equal an uninterrupted one.

:func:`align` is the one-call API: base run or module in, aligned run directory out. The run is a
normal run directory -- ``model.safetensors`` (the aligned velocity model; LoRA merged in) +
``config.json`` (the base run's ``flow``/``data`` sections, so ``sf.load``, ``straightflow sample``
and ``eval`` accept it, plus ``"align": {...}``) + ``train_state.safetensors`` (resume) and, with
LoRA, ``adapter.safetensors`` (the adapter alone, reloadable with :func:`.lora.load_adapter`).
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..checkpoint import CONFIG_FILE, MODEL_FILE, load, save_weights
from ..coupling import get_coupling
from ..data import Dataset
from ..io import save_json, save_tensors
from ..paths import get_path
from ..registry import Registry
from ..train import Trainer, TrainSettings

__all__ = ["METHODS", "available", "AlignModule", "AlignObjective", "AlignTrainer", "AlignResult", "align",
           "check_reward", "RewardError", "export_policy", "prompts", "COST_KEYS", "load_base", "sample_base",
           "forward_equivalents"]

METHODS: Registry = Registry("alignment method")

COST_KEYS = ("forward", "grad_forward", "reference", "reference_grad", "reward", "reward_grad", "env_steps")


def available() -> List[str]:
    """Registered alignment method names (``straightflow align --method``)."""
    return METHODS.names()


class RewardError(ValueError):
    """A reward returned something unusable: wrong shape, NaN/Inf, or no gradient where one is needed."""


# ----------------------------------------------------------------------------- the container
def _is_peft(m: nn.Module) -> bool:
    return hasattr(m, "peft_config") and hasattr(m, "disable_adapter")


def _base_of(policy: nn.Module) -> nn.Module:
    return policy.get_base_model() if _is_peft(policy) else policy


def policy_config(policy: nn.Module) -> Dict[str, Any]:
    """The velocity model's straightflow config, or ``{"name": "external", "class": ...}``."""
    cfg = getattr(_base_of(policy), "config", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
        try:
            json.dumps(cfg)
            return dict(cfg)
        except TypeError:
            pass
    return {"name": "external", "class": type(_base_of(policy)).__name__}


class AlignModule(nn.Module):
    """What the trainer trains: ``policy`` (the velocity model), ``heads`` (extra trainable networks)
    and the ``cost`` counters (:data:`COST_KEYS`, int64 buffer). ``forward(x, t, **cond)`` is the
    policy's velocity; ``forward(x, t, part=name, **cond)`` runs head ``name``."""

    def __init__(self, policy: nn.Module, heads: Optional[Dict[str, nn.Module]] = None,
                 info: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.policy = policy
        self.heads = nn.ModuleDict(heads or {})
        self.register_buffer("cost", torch.zeros(len(COST_KEYS), dtype=torch.int64))
        self.config = {"name": "align", "policy": policy_config(policy),
                       "heads": {k: getattr(h, "config", type(h).__name__) for k, h in self.heads.items()},
                       **(info or {})}
        for key in ("num_classes", "null_class", "sample_shape"):
            if hasattr(_base_of(policy), key):
                setattr(self, key, getattr(_base_of(policy), key))

    def forward(self, x: Tensor, t: Tensor, part: str = "velocity", **cond) -> Tensor:
        if part == "velocity":
            return self.policy(x, t, **cond)
        return self.heads[part](x, t, **cond)

    def count(self, key: str, n: int) -> None:
        self.cost[COST_KEYS.index(key)] += int(n)

    def costs(self) -> Dict[str, int]:
        return {k: int(v) for k, v in zip(COST_KEYS, self.cost.tolist())}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def export_policy(module: nn.Module) -> nn.Module:
    """A plain copy of the aligned velocity model in eval mode (a LoRA adapter merged into its weights)."""
    module = _unwrap(module)
    policy = module.policy if isinstance(module, AlignModule) else module
    policy = copy.deepcopy(policy)
    if _is_peft(policy):
        policy = policy.merge_and_unload()
    for p in policy.parameters():
        p.requires_grad_(True)
    return policy.eval()


# ----------------------------------------------------------------------------- rewards
def check_reward(reward: Callable[[Tensor], Tensor], x: Tensor, need_grad: bool = False, where: str = "") -> Tensor:
    """``reward(x)`` as a (B,) float tensor, or a :class:`RewardError` saying what was wrong and what is
    accepted: not a tensor of shape ``(B,)`` (or ``(B, 1)``), NaN/Inf values, or -- when ``need_grad`` --
    no gradient with respect to ``x``."""
    at = f" ({where})" if where else ""
    if need_grad and not x.requires_grad:
        x = x.detach().requires_grad_(True)
    r = reward(x)
    if not torch.is_tensor(r):
        raise RewardError(f"reward{at} returned {type(r).__name__}; expected a torch tensor of shape ({x.shape[0]},), "
                          "one value per sample")
    if r.ndim == 2 and r.shape[1] == 1:
        r = r[:, 0]
    if tuple(r.shape) != (x.shape[0],):
        raise RewardError(f"reward{at} returned shape {tuple(r.shape)} for a batch of {x.shape[0]} samples of shape "
                          f"{tuple(x.shape[1:])}; expected ({x.shape[0]},) (or ({x.shape[0]}, 1)), one value per sample")
    if not r.is_floating_point():
        r = r.to(x.dtype)
    bad = ~torch.isfinite(r.detach())
    if bool(bad.any()):
        idx = bad.nonzero().reshape(-1)[:5].tolist()
        raise RewardError(f"reward{at} returned {int(bad.sum())} NaN/Inf value(s) of {r.shape[0]} (rows {idx}); "
                          "rewards must be finite -- clip or guard the reward function (e.g. torch.nan_to_num)")
    if need_grad:
        if not r.requires_grad:
            raise RewardError(f"reward{at} has no gradient with respect to the sample (its output does not depend "
                              "differentiably on x, e.g. a hard indicator or a detached/numpy computation); this "
                              "method back-propagates through the reward -- use a differentiable reward (e.g. "
                              "'region:...:soft=T', 'class:C') or a black-box method (grpo, reinflow, rwr, dpo)")
        (g,) = torch.autograd.grad(r.sum(), x, retain_graph=True, allow_unused=True)
        if g is None:
            raise RewardError(f"reward{at} has no gradient with respect to the sample (autograd found no path from "
                              "x to the reward); use a differentiable reward or a black-box method (grpo, reinflow, rwr, dpo)")
    return r


def _as_reward(reward):
    if reward is None:
        return None
    if isinstance(reward, str):
        from .rewards import parse

        return parse(reward)
    if not callable(reward):
        raise TypeError(f"reward must be a spec string, a Reward or a callable r(x) -> (B,), got {type(reward).__name__}")
    return reward  # checked on every call by check_reward (shape, finiteness, gradient)


# ----------------------------------------------------------------------------- base models
def load_base(base: Union[str, Path, nn.Module]) -> Tuple[nn.Module, Dict[str, Any], Optional[str]]:
    """``(model, run config, run dir)`` from a run directory or a module (its ``run_config`` if any)."""
    if isinstance(base, (str, Path)):
        model = load(base)
        return model, dict(model.run_config), str(base)
    if not isinstance(base, nn.Module):
        raise TypeError(f"base must be a run directory or a torch.nn.Module velocity model, got {type(base).__name__}")
    cfg = dict(getattr(base, "run_config", None) or {})
    if "data" not in cfg:
        shape = getattr(_base_of(base), "sample_shape", None)
        if shape is None and isinstance(getattr(_base_of(base), "dim", None), int):
            shape = (base.dim,)
        if shape is not None:
            cfg["data"] = {"name": "unknown", "shape": [int(s) for s in shape]}
    return base, cfg, None


def sample_shape(model: nn.Module, cfg: Dict[str, Any]) -> Tuple[int, ...]:
    data = cfg.get("data") or {}
    if "shape" in data:
        return tuple(int(s) for s in data["shape"])
    shape = getattr(_base_of(model), "sample_shape", None)
    if shape is None:
        raise ValueError("cannot tell the sample shape of this model: give a run directory, a straightflow model, or a "
                         "module with .sample_shape")
    return tuple(int(s) for s in shape)


def prompt_labels(model: nn.Module, label: Optional[int], n: int) -> Optional[Tensor]:
    """The conditioning labels of aligned generation: ``label`` or the null class (unconditional) for a
    class-conditional model; ``None`` for an unconditional one."""
    k = getattr(_base_of(model), "num_classes", None)
    if not k:
        if label is not None:
            raise ValueError(f"label={label} needs a class-conditional model; this one is unconditional")
        return None
    if label is not None and not 0 <= int(label) < int(k):
        raise ValueError(f"label must be in [0, {k}) or None (the null class: unconditional generation), got {label}")
    lab = int(_base_of(model).null_class) if label is None else int(label)
    return torch.full((n,), lab, dtype=torch.long)


def prompts(model: nn.Module, shape: Sequence[int], n: int = 256, label: Optional[int] = None) -> Dataset:
    """The trainer's data for online methods: ``n`` placeholder rows (zeros of the sample shape) with the
    conditioning labels; the objective draws its own samples from the current model."""
    y = prompt_labels(model, label, n)
    k = None if y is None else int(_base_of(model).num_classes) + 1  # the null class is a valid prompt
    return Dataset(torch.zeros((n, *shape)), y=y, num_classes=k, name="prompts")


@torch.no_grad()
def sample_base(model: Callable, noise: Tensor, steps: int = 20, cond: Optional[Dict[str, Any]] = None,
                path="linear", solver: str = "euler", chunk: int = 512) -> Tensor:
    """ODE samples of ``model`` from ``noise`` (chunks of ``chunk`` rows)."""
    from ..solvers import sample

    outs = []
    for i in range(0, noise.shape[0], chunk):
        c = None if cond is None else {k: (v[i:i + chunk] if torch.is_tensor(v) and v.ndim and v.shape[0] == noise.shape[0]
                                          else v) for k, v in cond.items()}
        outs.append(sample(model, noise[i:i + chunk], solver=solver, steps=steps, cond=c, path=path).x)
    return torch.cat(outs)


# ----------------------------------------------------------------------------- objective base
def step_subset(K: int, k: Optional[int], generator: Optional[torch.Generator]) -> List[int]:
    """All ``K`` step indices, or ``k`` of them drawn without replacement from ``generator`` (sorted)."""
    if k is None or k >= K:
        return list(range(K))
    dev = generator.device if generator is not None else "cpu"
    return sorted(torch.randperm(K, generator=generator, device=dev)[:k].tolist())


class AlignObjective:
    """Base class of the alignment objectives (see the module docstring)."""

    name = "align"
    needs_reward_grad = False  # True: back-propagates through the reward (DRaFT, Adjoint Matching)
    online = True  # samples from the current model inside ``loss``; False: trains on a fixed data set
    default_reg = 0.0

    def __init__(self, model: nn.Module, reward=None, reg: Optional[float] = None, path="linear",
                 heads: Optional[Dict[str, nn.Module]] = None, reference: Optional[nn.Module] = None) -> None:
        if isinstance(model, AlignModule):
            self.model = model
        else:
            if not isinstance(model, nn.Module):
                raise TypeError(f"the model to align must be a torch.nn.Module, got {type(model).__name__}")
            self.model = AlignModule(model, heads=heads, info={"method": self.name})
        self.reward = _as_reward(reward)
        reg = self.default_reg if reg is None else reg
        if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg >= 0):
            raise ValueError(f"reg (regularisation to the base model) must be a finite number >= 0, got {reg!r}")
        self.reg = float(reg)
        self.path = get_path(path)
        self.coupling = get_coupling("independent")
        policy = self.model.policy
        if reference is not None:
            self.reference = reference.eval().requires_grad_(False)
        elif _is_peft(policy):
            self.reference = None  # the base network with its adapter disabled
        else:
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model to align has no trainable parameters")

    def require(self, reward: bool = True, **ints: Tuple[int, int, str]) -> None:
        """Validate the common options: a reward is given (``reward``) and each ``name=(value, low, why)`` is
        an int >= low; raises a ValueError naming the method, the option and what is accepted."""
        if reward and self.reward is None:
            raise ValueError(f"method {self.name!r} needs a reward (e.g. 'class:3', 'region:disc:0,0,1', 'ink')")
        for key, (value, low, why) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.name}: {key} must be an int >= {low}{why}, got {value!r}")

    # ---------------------------------------------------------------- settings
    def settings(self) -> Dict[str, Any]:
        """Method-specific settings (JSON); ``config()`` adds the common ones."""
        return {}

    def config(self) -> Dict[str, Any]:
        return {"objective": self.name, "reg": self.reg, "path": self.path.config(),
                "reward": getattr(self.reward, "name", None) if self.reward is not None else None,
                **self.settings()}

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def module(model: Optional[nn.Module]) -> AlignModule:
        return _unwrap(model)

    def velocity(self, model: nn.Module, x: Tensor, t: Tensor, cond: Optional[Dict[str, Any]] = None) -> Tensor:
        """The current model's velocity (counted: a forward with grad is also a backward later)."""
        v = model(x, t, **(cond or {}))
        self.module(model).count("grad_forward" if torch.is_grad_enabled() else "forward", x.shape[0])
        return v

    def ref_velocity(self, model: nn.Module, x: Tensor, t: Tensor, cond: Optional[Dict[str, Any]] = None) -> Tensor:
        """The frozen base model's velocity (no grad)."""
        m = self.module(model)
        m.count("reference", x.shape[0])
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(x, t, **(cond or {}))
            with m.policy.disable_adapter():
                return m.policy(x, t, **(cond or {}))

    def score(self, model: nn.Module, x: Tensor, grad: bool = False, where: str = "training") -> Tensor:
        """Checked rewards of ``x`` (with a graph to ``x`` when ``grad``)."""
        if self.reward is None:
            raise ValueError(f"method {self.name!r} needs a reward (e.g. 'class:3', 'region:disc:0,0,1')")
        self.module(model).count("reward_grad" if grad else "reward", x.shape[0])
        if grad:
            return check_reward(self.reward, x, need_grad=True, where=where)
        with torch.no_grad():
            return check_reward(self.reward, x, where=where).detach()

    def t_grid(self, steps: int, device=None) -> List[float]:
        return [i / steps for i in range(steps + 1)]

    def probe(self, base: nn.Module, shape: Sequence[int], cond: Optional[Dict[str, Any]], seed: int = 0) -> None:
        """Check the reward on a few base samples before any training (bad input fails fast)."""
        if self.reward is None:
            return
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((4, *shape), generator=g)
        c = None if cond is None else {k: v[:1].expand(4, *v.shape[1:]) if torch.is_tensor(v) and v.ndim else v
                                       for k, v in cond.items()}
        x = sample_base(base, x, steps=2, cond=c, path=self.path)
        check_reward(self.reward, x, need_grad=self.needs_reward_grad, where="checked on 4 base samples before training")

    def make_data(self, base: nn.Module, shape: Sequence[int], label: Optional[int], n: int, seed: int,
                  out: Optional[Path]) -> Any:
        """The trainer's data (online methods: prompts)."""
        return prompts(base, shape, n, label)

    def loss(self, x1: Tensor, cond: Optional[Dict[str, Tensor]] = None, x0: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None, model: Optional[nn.Module] = None) -> Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------- trainer + run files
class AlignTrainer(Trainer):
    """The trainer, writing an aligned *run*: the exported velocity model (LoRA merged) with the base run's
    config sections + ``"align"``, and the adapter alone when the model is LoRA-wrapped."""

    def __init__(self, objective: AlignObjective, data, out, steps: int, base_config: Optional[Dict[str, Any]] = None,
                 align_info: Optional[Dict[str, Any]] = None, **kw) -> None:
        super().__init__(objective, data, out, steps, **kw)
        self.base_config = copy.deepcopy(base_config or {})
        self.align_info = copy.deepcopy(align_info or {})

    def run_config(self) -> Dict[str, Any]:
        cfg = {k: v for k, v in self.base_config.items() if k not in ("model", "straightflow_version", "train")}
        cfg["train"] = self.settings()
        cfg["align"] = {**self.align_info, "objective": self.flow.config(), "prompt_data": self.data_info()}
        cfg.update(copy.deepcopy(self.extra_config))
        return cfg

    def _write_run(self) -> None:  # the trainer's checkpoint, with the aligned run's own files
        write_run(self.out, self._export_model(), self.run_config())


def write_run(out: Path, module: nn.Module, config: Dict[str, Any]) -> None:
    """Write ``module``'s aligned velocity model as a run (weights first, then config; both atomic)."""
    from .lora import adapter_state, lora_config_of

    module = _unwrap(module)
    policy = module.policy if isinstance(module, AlignModule) else module
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(config)
    if _is_peft(policy):
        save_tensors(out / "adapter.safetensors", adapter_state(policy))
        cfg.setdefault("align", {})["lora"] = lora_config_of(policy)
    pcfg = policy_config(policy)
    if pcfg["name"] != "external":
        from ..checkpoint import straightflow_version

        merged = export_policy(module)
        save_weights(out / MODEL_FILE, merged)
        cfg["model"] = pcfg
        cfg["straightflow_version"] = straightflow_version()
        save_json(out / CONFIG_FILE, cfg)
    else:  # a foreign network (e.g. a diffusers transformer): the adapter and the settings only
        cfg["model"] = pcfg
        save_json(out / "align.json", cfg)


@dataclass
class AlignResult:
    """``model``: the aligned velocity model (EMA weights, LoRA merged, eval mode); ``module``: the trained
    :class:`AlignModule` (raw weights); ``cost``: model calls by kind (:data:`COST_KEYS`) plus
    ``data_forward`` (rows spent making the training data) and ``seconds``."""

    run_dir: Optional[Path]
    model: nn.Module
    module: AlignModule
    steps: int
    final_loss: float
    history: List[Tuple[int, float]] = field(default_factory=list)
    cost: Dict[str, float] = field(default_factory=dict)
    objective: Optional[AlignObjective] = None


def align(base: Union[str, Path, nn.Module], method: str = "dpo", reward=None, out: Optional[Union[str, Path]] = None,
          steps: int = 200, *, label: Optional[int] = None, reg: Optional[float] = None, lora: Optional[Dict[str, Any]] = None,
          batch_size: int = 32, lr: float = 1e-4, ema: float = 0.0, grad_clip: float = 1.0, ckpt_every: int = 100,
          seed: int = 0, progress: bool = True, device: str = "cpu", n_data: Optional[int] = None,
          preferences: Optional[Any] = None, warmup: int = 0, settings: Optional[TrainSettings] = None,
          **opts: Any) -> AlignResult:
    """Align ``base`` (a run directory or a velocity module) with ``method`` (:func:`available`).

    ``reward``: a spec string (``"class:3"``, ``"region:disc:2,0,0.5"``), a Reward or any callable
    ``r(x) -> (B,)``. ``preferences``: for ``dpo``/``sft``, a :class:`~.prefs.Preferences` or a path to a
    samples file + pairs file (``(samples.safetensors, pairs.jsonl)``) instead of pairs generated from the
    reward. ``label``: the class the aligned generation is conditioned on (default: the null class, i.e.
    unconditional). ``reg``: regularisation to the base model (the method's default when None). ``lora``:
    ``{"r": 4, "alpha": 4, ...}`` to train a LoRA adapter (:mod:`.lora`) instead of all weights.
    ``steps``: optimizer steps (the budget). ``out``: the run directory (resumes if it holds a training
    state). ``opts``: method options (see each method's class). ``settings``: the training settings as one
    value (a :class:`~straightflow.train.TrainSettings`), replacing ``steps``, ``batch_size``, ``lr``, ``ema``,
    ``grad_clip``, ``ckpt_every``, ``seed``, ``progress``, ``device`` and ``warmup`` (which build it when it is
    None). Returns an :class:`AlignResult`.
    """
    t0 = time.process_time()
    if settings is None:
        settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema, grad_clip=grad_clip,
                                 ckpt_every=ckpt_every, seed=seed, progress=progress, device=device, warmup=warmup,
                                 log_every=min(50, steps) if isinstance(steps, int) and steps >= 1 else 50)
    elif not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    seed, batch_size = settings.seed, settings.batch_size
    cls = METHODS.get(method)
    check_options(cls, opts)
    model, base_cfg, base_dir = load_base(base)
    shape = sample_shape(model, base_cfg)
    path = (base_cfg.get("flow") or {}).get("path", "linear")
    policy = copy.deepcopy(model)
    policy.train()
    for p in policy.parameters():
        p.requires_grad_(True)
    lora_cfg = None
    if lora:
        from .lora import apply_lora

        policy = apply_lora(policy, **lora)
        lora_cfg = dict(lora)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if not lora else None
    kwargs = dict(opts)
    if getattr(cls, "takes_preferences", False):
        kwargs["preferences"] = preferences
    elif preferences is not None:
        raise ValueError(f"method {cls.name!r} does not train on preference pairs; preferences are for "
                         f"{', '.join(n for n in available() if getattr(METHODS.get(n), 'takes_preferences', False))}")
    objective = cls(policy, reward=reward, reg=reg, path=path, reference=ref, **kwargs)
    cond = None
    labels = prompt_labels(model, label, 4)
    if labels is not None:
        cond = {"y": labels}
    outp = None if out is None else Path(out)
    objective.probe(model, shape, cond, seed)
    n = n_data if n_data is not None else max(256, batch_size)
    data = objective.make_data(model, shape, label, n, seed, outp)
    info = {"method": cls.name, "base_run": base_dir, "label": label, "lora": lora_cfg,
            "data_forward": int(getattr(objective, "data_forward", 0))}
    trainer = AlignTrainer(objective, data, outp, None, base_config=base_cfg, align_info=info, settings=settings)
    res = trainer.fit()
    module = _unwrap(trainer.model)
    aligned = export_policy(trainer._export_model())
    aligned.run_config = trainer.run_config() | {"model": policy_config(module.policy)}
    cost: Dict[str, float] = dict(module.costs())
    cost["data_forward"] = int(getattr(objective, "data_forward", 0))
    cost["seconds"] = round(time.process_time() - t0, 3)
    return AlignResult(run_dir=outp, model=aligned, module=module, steps=res.steps, final_loss=res.final_loss,
                       history=res.history, cost=cost, objective=objective)


_SET_BY_ALIGN = ("model", "reward", "reg", "path", "reference", "heads", "preferences")


def method_options(cls) -> List[str]:
    """The ``opts`` (``--opt KEY=VALUE``) an alignment method's class accepts: the keyword parameters of its
    ``__init__`` and of the parents it forwards ``**kw`` to, less those :func:`align` sets itself."""
    names: set = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return sorted(names - {"self", *_SET_BY_ALIGN})


def check_options(cls, opts: Dict[str, Any]) -> None:
    """``ValueError`` naming the options ``cls`` does not take and those it does (before any work)."""
    known = method_options(cls)
    bad = sorted(set(opts) - set(known))
    if bad:
        raise ValueError(f"method {cls.name!r} has no option {', '.join(map(repr, bad))}; its options: "
                         + (", ".join(known) if known else "none"))


def forward_equivalents(cost: Dict[str, float]) -> float:
    """Training compute in model-forward equivalents: forwards without grad (sampling, reference, data
    generation) count 1, forwards that are back-propagated (the trained model's, the lean adjoint's VJPs)
    count 3 (forward + backward ~ 2 forwards). Reward evaluations are not model calls and are reported apart."""
    c = dict(cost)
    return float(c.get("forward", 0) + c.get("reference", 0) + c.get("data_forward", 0)
                 + 3 * (c.get("grad_forward", 0) + c.get("reference_grad", 0)))
