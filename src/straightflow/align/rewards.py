"""Rewards for the alignment tasks, beside :mod:`straightflow.control.rewards`.

- :class:`InkReward` -- an "aesthetic" reward on digits: stroke thickness as the mean ink of the image,
  ``r(x) = mean_pixels (clamp(x, -1, 1) + 1) / 2`` (images in [-1, 1], ink = 1; pixels pushed outside the
  range earn nothing), or, with a ``threshold``, the soft
  fraction of strongly inked pixels ``mean sigmoid((x - threshold) / temperature)`` -- the same reward at
  other parameters, used as the *held-out* reward of the thickness task (a model that greys the
  background raises the mean ink but not the share of strongly inked pixels).
- :func:`held_out_classifier` -- ``log p(c | x)`` under a *second* digits classifier, trained with another
  seed (and so another initialisation, train/held-out split and augmentation draws) through the metrics
  classifier machinery and cached like the first: the held-out reward of the class task, which catches a
  model that fools the training classifier without drawing the class.
- :func:`parse` -- ``"ink"``, ``"ink:0.5"`` (threshold), ``"class-heldout:3"`` and every spec of
  :func:`straightflow.control.rewards.parse_reward`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..control.rewards import ClassLogProb, Reward, parse_reward

__all__ = ["InkReward", "held_out_classifier", "parse", "HELD_OUT_EXTRACTOR"]

HELD_OUT_EXTRACTOR = "digits-heldout-s1"


class InkReward(Reward):
    """Stroke thickness of images in [-1, 1] (module docstring). Differentiable."""

    def __init__(self, threshold: Optional[float] = None, temperature: float = 0.05) -> None:
        if threshold is not None and not -1.0 <= float(threshold) <= 1.0:
            raise ValueError(f"ink threshold must be in [-1, 1] (pixel values), got {threshold}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.threshold = None if threshold is None else float(threshold)
        self.temperature = float(temperature)
        self.name = "mean ink" if threshold is None else f"ink>{self.threshold:g} (soft T={self.temperature:g})"

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).clamp(-1, 1)  # no credit for pixels outside the image range
        if self.threshold is None:
            return ((flat + 1) / 2).mean(1)
        return torch.sigmoid((flat - self.threshold) / self.temperature).mean(1)


def held_out_classifier(target: int, seed: int = 1, steps: Optional[int] = None) -> ClassLogProb:
    """``log p(target | x)`` under a second digits classifier (seed ``seed``, cached as
    ``digits-heldout-s<seed>``): same architecture, another initialisation, split and augmentation.
    ``steps`` overrides the recipe's training steps (cached under another name)."""
    from ..metrics import feature_extractor, load_digits_images

    x, y = load_digits_images(8)
    name = f"digits-heldout-s{seed}" + ("" if steps is None else f"-n{int(steps)}")
    clf = feature_extractor(name, x=x, y=y, seed=seed, steps=steps)
    r = ClassLogProb(target, classifier=clf)
    r.name = f"held-out log p(class {target})"
    return r


def parse(spec: str) -> Reward:
    """A reward from a string: ``ink``, ``ink:THRESHOLD``, ``class-heldout:C``, or any
    :func:`~straightflow.control.rewards.parse_reward` spec (``class:C``, ``region:...``)."""
    s = str(spec)
    head, _, rest = s.partition(":")
    if head == "ink":
        return InkReward(float(rest) if rest else None)
    if head == "class-heldout":
        try:
            return held_out_classifier(int(rest))
        except ValueError as e:
            raise ValueError(f"bad reward {spec!r}: {e}") from None
    try:
        return parse_reward(s)
    except ValueError as e:
        raise ValueError(f"{e}; alignment also accepts 'ink', 'ink:THRESHOLD', 'class-heldout:C'") from None
