"""Rewards for inference-time search and noise optimisation: plain callables ``r(x) -> (B,)``.

- :class:`ClassLogProb` — ``r(x) = log softmax(f(x))_c``, the log-probability of a target class
  ``c`` under the project's digits classifier (``straightflow.metrics.feature_extractor``).
- :class:`RegionReward` — a 2D (or any-D) region indicator: a disc ``|x - c| <= r`` or a
  half-plane ``n . x >= b``; hard (0/1) or soft ``sigmoid(d(x) / temperature)`` with ``d`` the
  signed distance to the boundary (positive inside).
- :class:`FunctionReward` — wraps any user function and checks its output shape.

``parse_reward("class:3" | "region:disc:cx,cy,r[:hard|:soft=T]" | "region:halfplane:nx,ny,b")``
builds one from a CLI string. All rewards are differentiable where the underlying function is
(the soft region and the classifier), so they serve :func:`~straightflow.control.adjoint.optimise_noise`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry, UnknownNameError

__all__ = ["Reward", "ClassLogProb", "RegionReward", "FunctionReward", "as_reward", "parse_reward",
           "REWARDS", "REWARD_KINDS", "REGION_KINDS"]

REWARDS: Registry = Registry("reward")
"""``build(spec, parts, classifier) -> Reward`` of every reward kind (the part of a spec before the first ``:``)."""
REWARD_KINDS = ("class", "region")
"""The reward kind names, in the order the docs list them (those of :data:`REWARDS`)."""
REGION_KINDS = ("disc", "halfplane")


class Reward:
    """Base class: ``__call__(x) -> (B,)`` float tensor; ``name`` describes it in tables."""

    name: str = "reward"

    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class ClassLogProb(Reward):
    """``r(x) = log p(c | x) = log softmax(logits(x))_c`` with the project's digit classifier.

    ``classifier`` is an extractor name (``"digits"``, ``"mnist"``, or a cached custom one) or any
    module mapping ``(B, 1, H, W)`` images in ``[-1, 1]`` to logits ``(B, K)``. Inputs of shape
    ``(B, H*W)`` are reshaped to square images. Differentiable in ``x``.
    """

    def __init__(self, target: int, classifier: Union[str, nn.Module] = "digits") -> None:
        from ..metrics import feature_extractor

        self.classifier = feature_extractor(classifier) if isinstance(classifier, str) else classifier
        k = getattr(self.classifier, "n_classes", None)
        target = int(target)
        if target < 0 or (k is not None and target >= int(k)):
            raise ValueError(f"target class must be in [0, {k}), got {target}")
        self.target = target
        self.name = f"log p(class {target})"

    def logits(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            side = int(round(x.shape[1] ** 0.5))
            if side * side != x.shape[1]:
                raise ValueError(f"class reward needs images (B, 1, H, W) or (B, H*W), got {tuple(x.shape)}")
            x = x.reshape(-1, 1, side, side)
        p = next(self.classifier.parameters(), None)
        if p is not None and p.device != x.device:  # follow the samples (a model on --device cuda)
            self.classifier = self.classifier.to(x.device)
        if p is not None and x.dtype != p.dtype:
            x = x.to(p.dtype)
        return self.classifier(x)

    def __call__(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.logits(x), dim=-1)[:, self.target]


class RegionReward(Reward):
    """Indicator of a region of R^D (on the first two coordinates for ``halfplane``/``disc`` in 2D).

    ``disc``: centre ``c`` and radius ``r``, signed distance ``d = r - |x - c|``.
    ``halfplane``: unit normal ``n`` and offset ``b``, ``d = n . x - b`` (inside where ``n . x >= b``).
    ``temperature=None`` gives the hard indicator ``1[d >= 0]`` (not differentiable); a positive
    temperature gives ``sigmoid(d / temperature)`` in (0, 1).
    """

    def __init__(self, kind: str = "disc", center: Sequence[float] = (0.0, 0.0), radius: float = 1.0,
                 normal: Sequence[float] = (1.0, 0.0), offset: float = 0.0,
                 temperature: Optional[float] = 0.1) -> None:
        kind = str(kind).lower()
        if kind not in REGION_KINDS:
            raise ValueError(f"unknown region {kind!r}; valid: {', '.join(REGION_KINDS)}")
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0 (or None for the hard indicator), got {temperature}")
        self.kind, self.temperature = kind, (None if temperature is None else float(temperature))
        if kind == "disc":
            if not float(radius) > 0:
                raise ValueError(f"disc radius must be > 0, got {radius}")
            self.center = torch.as_tensor(list(center), dtype=torch.float64)
            self.radius = float(radius)
            self.name = f"disc(c={[round(float(c), 3) for c in center]}, r={self.radius:g})"
        else:
            n = torch.as_tensor(list(normal), dtype=torch.float64)
            if float(n.norm()) == 0:
                raise ValueError("half-plane normal must be nonzero")
            self.normal, self.offset = n / n.norm(), float(offset)
            self.name = f"halfplane(n={[round(float(v), 3) for v in self.normal]}, b={self.offset:g})"
        self.name += " hard" if self.temperature is None else f" soft T={self.temperature:g}"

    def signed_distance(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if self.kind == "disc":
            c = self.center.to(x)
            if x.shape[1] != c.numel():
                raise ValueError(f"disc centre has {c.numel()} coordinates but x has {x.shape[1]}")
            return self.radius - (x - c).norm(dim=1)
        n = self.normal.to(x)
        if x.shape[1] != n.numel():
            raise ValueError(f"half-plane normal has {n.numel()} coordinates but x has {x.shape[1]}")
        return x @ n - self.offset

    def __call__(self, x: Tensor) -> Tensor:
        d = self.signed_distance(x)
        if self.temperature is None:
            return (d >= 0).to(x.dtype)
        return torch.sigmoid(d / self.temperature)


class FunctionReward(Reward):
    """Any user function ``fn(x) -> (B,)`` (or ``(B, 1)``), checked for shape and finiteness."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: Optional[str] = None) -> None:
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "user reward")

    def __call__(self, x: Tensor) -> Tensor:
        r = self.fn(x)
        if not torch.is_tensor(r):
            r = torch.as_tensor(r, dtype=x.dtype, device=x.device)
        if r.ndim == 2 and r.shape[1] == 1:
            r = r[:, 0]
        if r.shape != (x.shape[0],):
            raise ValueError(f"reward must return shape ({x.shape[0]},) for a batch of {x.shape[0]}, "
                             f"got {tuple(r.shape)}")
        if not r.is_floating_point():
            r = r.to(x.dtype)
        return r


def as_reward(reward: Union[str, Reward, Callable[[Tensor], Tensor]]) -> Reward:
    """A :class:`Reward` from a spec string, a Reward, or any callable."""
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        return parse_reward(reward)
    return FunctionReward(reward)


def _floats(s: str, n: int, what: str) -> list:
    try:
        vals = [float(v) for v in s.split(",")]
    except ValueError:
        raise ValueError(f"{what}: expected {n} comma-separated numbers, got {s!r}") from None
    if len(vals) != n:
        raise ValueError(f"{what}: expected {n} comma-separated numbers, got {len(vals)} in {s!r}")
    return vals


def parse_reward(spec: str, classifier: Union[str, nn.Module] = "digits") -> Reward:
    """Build a reward from a string.

    ``class:C`` (classifier log-probability of class C); ``region:disc:cx,cy,r``;
    ``region:halfplane:nx,ny,b``; a region may end with ``:hard`` or ``:soft=T`` (default soft 0.1).
    """
    parts = str(spec).split(":")
    try:
        build = REWARDS.get(parts[0])
    except UnknownNameError as e:
        raise UnknownNameError(f"{e} (e.g. 'class:3', 'region:disc:0,0,1', 'region:halfplane:1,0,0.5:hard')") from None
    return build(spec, parts, classifier)


@REWARDS.register("class")
def _class_reward(spec: str, parts: list, classifier: Union[str, nn.Module]) -> Reward:
    if len(parts) != 2:
        raise ValueError(f"class reward spec is 'class:C', got {spec!r}")
    try:
        return ClassLogProb(int(parts[1]), classifier)
    except ValueError as e:
        raise ValueError(f"bad class reward {spec!r}: {e}") from None


@REWARDS.register("region")
def _region_reward(spec: str, parts: list, classifier: Union[str, nn.Module]) -> Reward:
    if len(parts) < 3:
        raise ValueError(f"region reward spec is 'region:disc:cx,cy,r' or 'region:halfplane:nx,ny,b', got {spec!r}")
    shape, args = parts[1].lower(), parts[2]
    temp: Optional[float] = 0.1
    for extra in parts[3:]:
        e = extra.lower()
        if e == "hard":
            temp = None
        elif e.startswith("soft"):
            temp = float(e.split("=", 1)[1]) if "=" in e else 0.1
        else:
            raise ValueError(f"unknown region option {extra!r} in {spec!r}; valid: hard, soft=T")
    if shape == "disc":
        cx, cy, r = _floats(args, 3, "region:disc")
        return RegionReward("disc", center=(cx, cy), radius=r, temperature=temp)
    if shape == "halfplane":
        nx, ny, b = _floats(args, 3, "region:halfplane")
        return RegionReward("halfplane", normal=(nx, ny), offset=b, temperature=temp)
    raise ValueError(f"unknown region {shape!r} in {spec!r}; valid: {', '.join(REGION_KINDS)}")
