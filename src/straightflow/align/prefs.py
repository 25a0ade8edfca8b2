"""Preference data: samples with ids, and pairs (chosen, rejected) of those ids.

File format (what :func:`generate_preferences` writes and :func:`load_preferences` reads; a user's
own pairs use the same two files):

* ``samples.safetensors`` -- ``x`` (N, ...) float samples, ``id`` (N,) int64 *unique* sample ids;
  optional ``y`` (N,) int64 labels (the condition each sample was generated with) and ``reward``
  (N,) float (Flow-RWR weights them by it).
* ``pairs.jsonl`` -- one JSON object per line, ``{"id": <unique pair id>, "chosen": <sample id>,
  "rejected": <sample id>}`` (a ``.json`` file holding a list of such objects works too).

Loading checks everything before any training and says what is wrong: a missing tensor or key,
duplicated sample or pair ids, a pair naming a sample id that is not in the samples file, shapes
that disagree, NaN/Inf samples, chosen and rejected generated under different labels.

Generated pairs (Liu et al. 2025, "Improving Video Generation with Human Feedback", trained their
Flow-DPO on pairs ranked by a reward model): ``k`` base samples per prompt from independent noise,
scored by the reward; the pair is (best, worst) of the ``k``. The samples, their rewards and the
pairs are kept, so Flow-RWR (all samples, weighted by reward), plain fine-tuning on the chosen
samples and Flow-DPO (the pairs) train on exactly the same generations.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..io import CheckpointError, atomic_write_bytes, load_tensors, save_tensors

__all__ = ["Preferences", "PreferenceError", "load_preferences", "save_preferences", "generate_preferences",
           "as_preferences"]

SAMPLES_FILE = "samples.safetensors"
PAIRS_FILE = "pairs.jsonl"


class PreferenceError(ValueError):
    """Preference data that cannot be used (missing / duplicated ids, bad shapes, ...)."""


@dataclass
class Preferences:
    """Samples ``x`` with unique ``ids`` (+ optional labels ``y`` and ``reward``) and pairs of row indices."""

    x: Tensor
    ids: Tensor
    chosen: Tensor  # (P,) row indices into x
    rejected: Tensor  # (P,) row indices into x
    pair_ids: List[Any]
    y: Optional[Tensor] = None
    reward: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def chosen_x(self) -> Tensor:
        return self.x[self.chosen]

    def rejected_x(self) -> Tensor:
        return self.x[self.rejected]


def _fail(where: str, msg: str) -> PreferenceError:
    return PreferenceError(f"{where}: {msg}")


def _check_samples(x: Tensor, ids: Tensor, y: Optional[Tensor], reward: Optional[Tensor], where: str) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2:
        raise _fail(where, f"'x' must be a float tensor (N, ...) of samples, got {getattr(x, 'shape', type(x))}")
    if ids.ndim != 1 or ids.shape[0] != x.shape[0] or ids.is_floating_point():
        raise _fail(where, f"'id' must be an integer tensor of shape ({x.shape[0]},) (one id per sample), got "
                           f"{tuple(ids.shape)} {ids.dtype}")
    uniq, counts = torch.unique(ids, return_counts=True)
    if bool((counts > 1).any()):
        dup = uniq[counts > 1][:5].tolist()
        raise _fail(where, f"duplicated sample ids {dup} ({int((counts > 1).sum())} ids appear more than once); "
                           "every sample needs its own id")
    if not bool(torch.isfinite(x).all()):
        raise _fail(where, f"'x' contains {int((~torch.isfinite(x)).sum())} NaN/Inf values")
    if y is not None and (y.shape != ids.shape or y.is_floating_point()):
        raise _fail(where, f"'y' must be integer labels of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}")
    if reward is not None and (reward.shape != ids.shape or not bool(torch.isfinite(reward).all())):
        raise _fail(where, f"'reward' must be finite floats of shape ({x.shape[0]},)")


def _read_pairs(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise PreferenceError(f"{path}: pairs file not found")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(recs, list):
            raise PreferenceError(f"{path}: expected a JSON list of {{'id', 'chosen', 'rejected'}} objects")
        return recs
    recs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PreferenceError(f"{path}, line {i}: not valid JSON ({e}); each line is "
                                  '{"id": ..., "chosen": <sample id>, "rejected": <sample id>}') from None
    return recs


def _pairs_from_records(recs: Sequence[Any], ids: Tensor, where: str) -> Tuple[Tensor, Tensor, List[Any]]:
    if not recs:
        raise _fail(where, "no pairs")
    row_of = {int(v): i for i, v in enumerate(ids.tolist())}
    seen: Dict[Any, int] = {}
    ch, rj, pids, unknown = [], [], [], []
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict):
            raise _fail(where, f"pair {i} is {type(rec).__name__}; expected an object with 'id', 'chosen', 'rejected'")
        missing = [k for k in ("id", "chosen", "rejected") if k not in rec]
        if missing:
            raise _fail(where, f"pair {i} has no {', '.join(repr(m) for m in missing)}; every pair needs "
                               "'id' (unique), 'chosen' and 'rejected' (sample ids)")
        pid = rec["id"]
        if pid in seen:
            raise _fail(where, f"duplicated pair id {pid!r} (pairs {seen[pid]} and {i}); pair ids must be unique")
        seen[pid] = i
        for key in ("chosen", "rejected"):
            v = rec[key]
            if isinstance(v, bool) or not isinstance(v, int) or v not in row_of:
                unknown.append((pid, key, v))
        if not unknown:
            ch.append(row_of[rec["chosen"]])
            rj.append(row_of[rec["rejected"]])
        pids.append(pid)
    if unknown:
        show = ", ".join(f"pair {p!r} {k}={v!r}" for p, k, v in unknown[:5])
        raise _fail(where, f"{len(unknown)} sample id(s) referenced by pairs are not in the samples file ({show}); "
                           f"known ids run from {int(ids.min())} to {int(ids.max())}")
    return torch.tensor(ch, dtype=torch.long), torch.tensor(rj, dtype=torch.long), pids


def as_preferences(x: Tensor, ids: Tensor, pairs: Sequence[Dict[str, Any]], y: Optional[Tensor] = None,
                   reward: Optional[Tensor] = None, where: str = "preferences") -> Preferences:
    """Build and check :class:`Preferences` from tensors and pair records (the in-memory form of the files)."""
    ids = torch.as_tensor(ids)
    _check_samples(x, ids, y, reward, where)
    ch, rj, pids = _pairs_from_records(pairs, ids, where)
    if y is not None and bool((y[ch] != y[rj]).any()):
        bad = int((y[ch] != y[rj]).nonzero()[0, 0])
        raise _fail(where, f"pair {pids[bad]!r}: chosen and rejected samples have different labels "
                           f"({int(y[ch[bad]])} vs {int(y[rj[bad]])}); a pair compares two samples of one prompt")
    return Preferences(x=x, ids=ids.long(), chosen=ch, rejected=rj, pair_ids=pids, y=y, reward=reward)


def load_preferences(samples: Union[str, Path], pairs: Optional[Union[str, Path]] = None) -> Preferences:
    """Read and check ``samples.safetensors`` + ``pairs.jsonl`` (``samples`` may be their directory)."""
    samples = Path(samples)
    if samples.is_dir():
        pairs = samples / PAIRS_FILE if pairs is None else pairs
        samples = samples / SAMPLES_FILE
    if pairs is None:
        raise PreferenceError("give the pairs file (pairs.jsonl) as well as the samples file")
    try:
        t = load_tensors(samples)
    except CheckpointError as e:
        raise PreferenceError(str(e)) from None
    for key in ("x", "id"):
        if key not in t:
            raise PreferenceError(f"{samples}: no {key!r} tensor; a samples file holds 'x' (N, ...) and 'id' (N,) "
                                  f"(optional 'y', 'reward'), found {sorted(t)}")
    recs = _read_pairs(Path(pairs))
    return as_preferences(t["x"].float(), t["id"], recs, t.get("y"), t.get("reward"),
                          where=f"{samples} + {pairs}")


def save_preferences(prefs: Preferences, out: Union[str, Path]) -> Path:
    """Write ``out/samples.safetensors`` and ``out/pairs.jsonl`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"x": prefs.x, "id": prefs.ids}
    if prefs.y is not None:
        tensors["y"] = prefs.y
    if prefs.reward is not None:
        tensors["reward"] = prefs.reward
    save_tensors(out / SAMPLES_FILE, tensors)
    lines = [json.dumps({"id": pid, "chosen": int(prefs.ids[c]), "rejected": int(prefs.ids[r])})
             for pid, c, r in zip(prefs.pair_ids, prefs.chosen.tolist(), prefs.rejected.tolist())]
    atomic_write_bytes(out / PAIRS_FILE, ("\n".join(lines) + "\n").encode())
    return out


@torch.no_grad()
def generate_preferences(model: Callable, reward: Callable[[Tensor], Tensor], shape: Sequence[int], n_pairs: int,
                         k: int = 4, cond_label: Optional[Tensor] = None, steps: int = 20, seed: int = 0,
                         path="linear") -> Tuple[Preferences, int]:
    """``n_pairs`` prompts x ``k`` base samples (Euler, ``steps``), scored; pair = (best, worst) of each
    prompt's ``k``. ``cond_label``: (n_pairs,) labels (or None). Returns ``(preferences, model rows spent)``."""
    from .base import check_reward, sample_base

    if k < 2:
        raise ValueError(f"k (samples per prompt) must be >= 2 to form a pair, got {k}")
    g = torch.Generator().manual_seed(int(seed))
    n = n_pairs * k
    noise = torch.randn((n, *shape), generator=g)
    y = None if cond_label is None else cond_label.repeat_interleave(k)
    x = sample_base(model, noise, steps=steps, cond=None if y is None else {"y": y}, path=path)
    r = torch.cat([check_reward(reward, x[i:i + 512], where="scoring generated samples").detach()
                   for i in range(0, n, 512)]).float()
    rr = r.reshape(n_pairs, k)
    base = torch.arange(n_pairs) * k
    ch, rj = base + rr.argmax(1), base + rr.argmin(1)
    ids = torch.arange(n, dtype=torch.long)
    prefs = Preferences(x=x, ids=ids, chosen=ch, rejected=rj, pair_ids=list(range(n_pairs)), y=y, reward=r)
    return prefs, n * steps


# ----------------------------------------------------------------------------- offline objectives
from ..data import Dataset  # noqa: E402
from ..io import load_json, save_json  # noqa: E402
from .base import AlignObjective, prompt_labels, _base_of  # noqa: E402


class PreferenceObjective(AlignObjective):
    """Base of the objectives that train on a fixed set of base generations (Flow-RWR, SFT, Flow-DPO).

    ``preferences``: a :class:`Preferences`, a samples/pairs directory, or ``(samples_file, pairs_file)``;
    by default ``n_data`` pairs are generated from the base model and the reward (``k`` samples per
    prompt, ``gen_steps`` Euler steps) and kept in ``<out>/preferences`` (reused on resume)."""

    online = False
    takes_preferences = True

    def __init__(self, model, reward=None, reg=None, path="linear", reference=None, preferences=None,
                 k: int = 4, gen_steps: int = 20, **kw) -> None:
        super().__init__(model, reward=reward, reg=reg, path=path, reference=reference, **kw)
        if reward is None and preferences is None:
            raise ValueError(f"method {self.name!r} needs a reward (to rank generated samples) or preference data "
                             "(a samples file and a pairs file)")
        self.preferences = preferences
        self.k, self.gen_steps = int(k), int(gen_steps)
        self.data_forward = 0
        self.prefs: Optional[Preferences] = None

    def settings(self) -> Dict[str, Any]:
        return {"k": self.k, "gen_steps": self.gen_steps,
                "preferences": None if self.preferences is None or isinstance(self.preferences, Preferences)
                else [str(p) for p in (self.preferences if isinstance(self.preferences, (tuple, list))
                                       else [self.preferences])]}

    def load_or_generate(self, base, shape, label, n, seed, out) -> Preferences:
        p = self.preferences
        if isinstance(p, Preferences):
            prefs = p
        elif p is not None:
            prefs = load_preferences(*p) if isinstance(p, (tuple, list)) else load_preferences(p)
        else:
            meta = {"reward": getattr(self.reward, "name", repr(self.reward)), "n_pairs": int(n), "k": self.k,
                    "steps": self.gen_steps, "seed": int(seed), "label": label}
            cache = None if out is None else Path(out) / "preferences"
            prefs = None
            if cache is not None and (cache / "meta.json").is_file():
                try:
                    if load_json(cache / "meta.json") == meta:
                        prefs = load_preferences(cache)
                except (ValueError, OSError):
                    prefs = None
            if prefs is None:
                labels = prompt_labels(base, label, n)
                prefs, rows = generate_preferences(base, self.reward, shape, n, k=self.k, cond_label=labels,
                                                   steps=self.gen_steps, seed=seed, path=self.path)
                if cache is not None:
                    save_preferences(prefs, cache)
                    save_json(cache / "meta.json", meta)
            self.data_forward = n * self.k * self.gen_steps
        if tuple(prefs.shape) != tuple(shape):
            raise PreferenceError(f"preference samples have shape {prefs.shape}, the model generates {tuple(shape)}")
        k = getattr(_base_of(base), "num_classes", None)
        if prefs.y is not None and not k:
            raise PreferenceError("preference samples carry labels 'y' but the model is unconditional")
        if k and prefs.y is not None and (int(prefs.y.min()) < 0 or int(prefs.y.max()) > int(k)):
            raise PreferenceError(f"preference labels must be in [0, {k}] ({k} = the null class)")
        self.prefs = prefs
        return prefs

    def dataset(self, x: Tensor, y: Optional[Tensor], base) -> Dataset:
        k = getattr(_base_of(base), "num_classes", None)
        if k and y is None:
            y = prompt_labels(base, None, x.shape[0])
        return Dataset(x, y=y, num_classes=None if y is None else int(k) + 1, name=f"{self.name}-data")
