"""Few-step distillation of a (reflowed) flow: k-step distillation, SlimFlow, conditional one-step.

k-step distillation (Liu et al. 2022, "Flow Straight and Fast", section on distillation;
InstaFlow, Liu et al. 2023). Given teacher pairs ``(x0, x1 = ODE_teacher(x0))``, train a student
``v`` so that ``k`` Euler steps on the grid ``t_i = i / k`` map ``x0`` to ``x1``. If the student
follows the straight line from ``x0`` to ``x1`` its state at ``t_i`` is
``x_{t_i} = t_i x1 + (1 - t_i) x0`` and the Euler step that lands on ``x1`` from there needs
``v(x_{t_i}, t_i) = (x1 - x_{t_i}) / (1 - t_i) = x1 - x0`` -- the same target at every grid
time. So the loss is ``D(v(x_{t_i}, t_i), x1 - x0)`` with ``i ~ U{0, ..., k-1}``: reflow's loss
restricted to the ``k`` grid times (``k = 1``: ``t = 0`` only, ``x1_hat = x0 + v(x0, 0)``).
``D`` is pseudo-Huber (Song & Dhariwal 2023) or MSE, optionally plus a perceptual term
``perceptual * mean_j (phi_j(x1_hat) - phi_j(x1))^2`` in the feature space ``phi`` of the
project's frozen digits classifier (:func:`straightflow.metrics.feature_extractor`), with
``x1_hat = x_t + (1 - t) v(x_t, t)``; it stands in for InstaFlow's LPIPS and needs images.

SlimFlow (Zhu et al. 2024, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified
Flow"), flow-guided distillation: a smaller student learns one-step generation from the
teacher's stored pairs plus, on fresh noise ``z``, the teacher's 2-step Euler prediction with a
random intermediate time ``t ~ U(t_lo, t_hi)`` (0.2-0.8 in the authors' code)::

    L = D(v_s(x0, 0), x1 - x0) + w * D(v_s(z, 0), x1_hat_2(z) - z),
    x1_hat_2(z) = z_t + (1 - t) v_T(z_t, t),   z_t = z + t v_T(z, 0)    (teacher, no gradient).

``intermediate="student"`` forms ``z_t = z + t v_s(z, 0)`` from the (detached) student's own
prediction instead, as the authors' code also offers.

Conditional straightening (InstaFlow with class labels in place of text):
:func:`conditional_onestep` samples pairs from a class-conditional teacher with
classifier-free guidance, reflows them into a 2-RF that takes ``y`` and needs no guidance, and
distils that into a one-step class-conditional student (NFE 1, no guidance at sampling).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..coupling import PairDataset, get_coupling
from ..io import FilePath
from ..losses import Loss, get_loss
from ..models import sample_shape
from ..solvers import initial_noise, sample
from ..solvers.guidance import ClassifierFreeGuidance
from ..train import TrainResult, train

__all__ = ["DistillObjective", "SlimFlowObjective", "distill", "slimflow_distill", "make_pairs",
           "conditional_onestep", "ConditionalOnestepResult", "distill_targets"]



def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def distill_targets(x0: Tensor, x1: Tensor, i: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(t, x_t, target)`` of k-step distillation at grid indices ``i`` (B,) in ``[0, k)``:
    ``t = i / k``, ``x_t = t x1 + (1 - t) x0``, ``target = (x1 - x_t) / (1 - t) = x1 - x0``."""
    t = i.to(x1.dtype) / k
    xt = _bcast(t, x1) * x1 + _bcast(1 - t, x1) * x0
    return t, xt, x1 - x0


class DistillObjective:
    """k-step distillation on stored pairs (see the module docstring); a trainer objective.

    ``straightflow.train(DistillObjective(student, k=1), pairs, steps)`` with ``pairs`` a
    :class:`~straightflow.coupling.PairDataset` of teacher ``(x0, x1)``.
    """

    name = "distill"

    def __init__(self, model: nn.Module, k: int = 1, loss: Union[str, Dict, Loss] = "pseudo_huber",
                 perceptual: float = 0.0, feature_net: Optional[nn.Module] = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (number of student Euler steps) must be an int >= 1, got {k!r}")
        if not (math.isfinite(perceptual) and perceptual >= 0):
            raise ValueError(f"perceptual weight must be >= 0, got {perceptual}")
        shape = sample_shape(model, required=False)
        if perceptual > 0 and shape is not None and len(shape) != 3:
            raise ValueError(f"the perceptual loss compares classifier features of images (C, H, W); this model's "
                             f"samples have shape {shape} (vectors). Use perceptual=0 for 2D/vector data")
        self.model = model
        self.k = int(k)
        self.loss_fn = get_loss(loss)
        self.perceptual = float(perceptual)
        self.feature_net = feature_net
        self.coupling = get_coupling("pairs")

    def config(self) -> Dict[str, Any]:
        return {"objective": self.name, "k": self.k, "loss": self.loss_fn.config(), "perceptual": self.perceptual,
                "coupling": self.coupling.config()}

    # ---------------------------------------------------------------- pieces
    def _features(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"the perceptual loss needs images (B, C, H, W), got data of shape {tuple(x.shape)}; "
                             "use perceptual=0 for 2D/vector data")
        if self.feature_net is None:
            from ..metrics import feature_extractor

            self.feature_net = feature_extractor("digits")
        net = self.feature_net
        net.eval().requires_grad_(False)
        p = next(net.parameters(), None)
        if p is not None and (p.device != x.device or p.dtype != x.dtype):
            net.to(device=x.device, dtype=x.dtype)
        return net.features(x) if hasattr(net, "features") else net(x)

    def perceptual_loss(self, x1_hat: Tensor, x1: Tensor) -> Tensor:
        """``mean_j (phi_j(x1_hat) - phi_j(x1))^2`` per sample, gradients to ``x1_hat`` only."""
        with torch.no_grad():
            f1 = self._features(x1)
        fh = self._features(x1_hat)
        return (fh - f1).pow(2).reshape(fh.shape[0], -1).mean(dim=1)

    def distill_loss(self, model: Callable, x0: Tensor, x1: Tensor, cond: Dict[str, Tensor],
                     generator: Optional[torch.Generator]) -> Tensor:
        """Per-sample k-step distillation loss (B,)."""
        i = torch.randint(0, self.k, (x1.shape[0],), generator=generator, device=x1.device)
        t, xt, target = distill_targets(x0, x1, i, self.k)
        pred = model(xt, t, **cond)
        per = self.loss_fn(pred, target, t)
        if self.perceptual > 0:
            x1_hat = xt + _bcast(1 - t, xt) * pred
            per = per + self.perceptual * self.perceptual_loss(x1_hat, x1)
        return per

    def loss(self, x1: Tensor, cond: Optional[Dict[str, Tensor]] = None, x0: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None, model: Optional[Callable] = None) -> Tensor:
        model = self.model if model is None else model
        if x0 is None:
            raise ValueError("distillation trains on stored teacher pairs: pass x0 (train on a PairDataset)")
        if x0.shape != x1.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != x1 shape {tuple(x1.shape)}")
        return self.distill_loss(model, x0, x1, dict(cond or {}), generator).mean()


class SlimFlowObjective(DistillObjective):
    """SlimFlow flow-guided distillation (Zhu et al. 2024) into a (smaller) one-step student.

    ``loss = D(v_s(x0, 0), x1 - x0) + guide_weight * D(v_s(z, 0), x1_hat_2(z) - z)`` on stored pairs
    ``(x0, x1)`` and fresh noise ``z`` (labels of the batch reused), ``x1_hat_2`` the teacher's
    2-step Euler prediction through a random ``t ~ U(t_range)`` (module docstring). ``guidance=w``
    evaluates the teacher with classifier-free guidance (for pairs made with guidance ``w``).
    """

    name = "slimflow"

    def __init__(self, model: nn.Module, teacher: Callable, guide_weight: float = 1.0,
                 loss: Union[str, Dict, Loss] = "pseudo_huber", t_range: Sequence[float] = (0.2, 0.8),
                 intermediate: str = "teacher", perceptual: float = 0.0,
                 feature_net: Optional[nn.Module] = None, guidance: Optional[float] = None) -> None:
        super().__init__(model, k=1, loss=loss, perceptual=perceptual, feature_net=feature_net)
        lo, hi = (float(v) for v in t_range)
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi < 1, got {tuple(t_range)}")
        if intermediate not in ("teacher", "student"):
            raise ValueError(f"intermediate must be 'teacher' or 'student', got {intermediate!r}")
        if not (math.isfinite(guide_weight) and guide_weight >= 0):
            raise ValueError(f"guide_weight must be >= 0, got {guide_weight}")
        if teacher is model:
            raise ValueError("the teacher must be a separate (frozen) model, not the student itself")
        self.teacher_model = teacher
        if isinstance(teacher, nn.Module):
            teacher.eval().requires_grad_(False)
        self.guidance = None if guidance is None else float(guidance)
        self.teacher = teacher if guidance is None else ClassifierFreeGuidance(teacher, float(guidance))
        self.guide_weight, self.t_range, self.intermediate = float(guide_weight), (lo, hi), intermediate

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "objective": self.name, "guide_weight": self.guide_weight,
                "t_range": list(self.t_range), "intermediate": self.intermediate, "guidance": self.guidance}

    def teacher_two_step(self, z: Tensor, t: Tensor, cond: Dict[str, Tensor],
                         first: Optional[Tensor] = None) -> Tensor:
        """``x1_hat_2 = z_t + (1 - t) v_T(z_t, t)``, ``z_t = z + t * first`` (``first = v_T(z, 0)`` by default)."""
        with torch.no_grad():
            if first is None:
                first = self.teacher(z, torch.zeros_like(t), **cond)
            zt = z + _bcast(t, z) * first
            return zt + _bcast(1 - t, z) * self.teacher(zt, t, **cond)

    def loss(self, x1: Tensor, cond: Optional[Dict[str, Tensor]] = None, x0: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None, model: Optional[Callable] = None) -> Tensor:
        model = self.model if model is None else model
        base = super().loss(x1, cond=cond, x0=x0, generator=generator, model=model)
        if self.guide_weight == 0:
            return base
        cond = dict(cond or {})
        if isinstance(self.teacher_model, nn.Module):
            self.teacher_model.to(x1.device)
        if self.guidance is not None and cond.get("y") is None:
            raise ValueError("SlimFlow with guidance needs labelled pairs (cond y)")
        z = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        lo, hi = self.t_range
        t = lo + (hi - lo) * torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        zero = torch.zeros_like(t)
        pred = model(z, zero, **cond)
        first = pred.detach() if self.intermediate == "student" else None
        target = self.teacher_two_step(z, t, cond, first) - z
        per = self.loss_fn(pred, target, zero)
        if self.perceptual > 0:
            per = per + self.perceptual * self.perceptual_loss(z + pred, target + z)
        return base + self.guide_weight * per.mean()


# ----------------------------------------------------------------------------- helpers


def _as_pairs(pairs: Union[PairDataset, FilePath]) -> PairDataset:
    if isinstance(pairs, PairDataset):
        return pairs
    if isinstance(pairs, (str, Path)):
        from .pairs import load_pairs

        return load_pairs(pairs)
    raise TypeError(f"pairs must be a PairDataset or a pairs directory, got {type(pairs).__name__}")


def _as_module(model: Union[nn.Module, FilePath]) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, Path)):
        from ..checkpoint import load

        return load(model)
    raise TypeError(f"expected a model or a run directory, got {type(model).__name__}")


def _student(student: Optional[nn.Module], init: Optional[Union[nn.Module, FilePath]]) -> nn.Module:
    if student is None and init is None:
        raise ValueError("give a student network, or init= (a model or run directory) to copy as the student")
    if student is None:
        student = copy.deepcopy(_as_module(init))
    elif init is not None:
        src = _as_module(init)
        try:
            student.load_state_dict(src.state_dict())
        except RuntimeError as e:
            raise ValueError(f"cannot initialise the student from {init!r}: architectures differ ({e}). "
                             "A smaller student (SlimFlow) trains from its own initialisation; drop init=") from e
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _fit_labels(pairs: PairDataset, student: nn.Module) -> PairDataset:
    """Drop the pairs' labels for an unconditional student; require them for a conditional one."""
    if pairs.y is not None and getattr(student, "num_classes", None) is None:
        return PairDataset(pairs.x0, pairs.x1, name=pairs.name)
    if pairs.y is None and getattr(student, "num_classes", None) is not None:
        raise ValueError("the student is class-conditional but the pairs carry no labels; generate them with labels")
    return pairs


def _extra(train_kw: Dict[str, Any], info: Dict[str, Any]) -> Dict[str, Any]:
    extra = dict(train_kw.pop("extra_config", None) or {})
    extra.setdefault("straighten", info)
    return extra


def distill(pairs: Union[PairDataset, FilePath], student: Optional[nn.Module] = None, k: int = 1, steps: int = 2000,
            out: Optional[FilePath] = None, init: Optional[Union[nn.Module, FilePath]] = None,
            loss: Union[str, Dict, Loss] = "pseudo_huber", perceptual: float = 0.0,
            feature_net: Optional[nn.Module] = None, **train_kw: Any) -> TrainResult:
    """Distil stored teacher pairs into a k-step student (:class:`DistillObjective`).

    ``pairs``: a PairDataset or a directory from ``generate_pairs``. ``student``: the network to
    train; ``init``: a model or run directory whose weights initialise it (InstaFlow initialises
    from the 2-RF; with ``student=None`` the student is a copy of ``init``). ``train_kw`` go to
    :func:`straightflow.train` (``batch_size``, ``lr``, ``ema_decay``, ``seed``...). Returns
    the :class:`~straightflow.train.TrainResult` (``.model`` is the EMA student).
    """
    ds = _as_pairs(pairs)
    net = _student(student, init)
    ds = _fit_labels(ds, net)
    obj = DistillObjective(net, k=k, loss=loss, perceptual=perceptual, feature_net=feature_net)
    info = {"method": "distill", "k": int(k), "pairs": ds.name, "pairs_nfe": int(getattr(ds, "total_nfe", 0))}
    extra = _extra(train_kw, info)
    return train(obj, ds, steps=steps, out=out, extra_config=extra, **train_kw)


def slimflow_distill(teacher: Union[Callable, FilePath], pairs: Union[PairDataset, FilePath], student: nn.Module,
                     steps: int = 2000, guide_weight: float = 1.0, t_range: Sequence[float] = (0.2, 0.8),
                     intermediate: str = "teacher", loss: Union[str, Dict, Loss] = "pseudo_huber",
                     out: Optional[FilePath] = None, init: Optional[Union[nn.Module, FilePath]] = None,
                     perceptual: float = 0.0, guidance: Optional[float] = None, **train_kw: Any) -> TrainResult:
    """SlimFlow: distil a (2-)RF teacher into a smaller one-step ``student`` with flow guidance
    (:class:`SlimFlowObjective`): the stored pairs plus the teacher's 2-step Euler predictions on
    fresh noise. ``init`` optionally initialises the student (e.g. a small annealing-reflow model);
    ``guidance`` is the teacher's CFG scale (default: the one the stored pairs were made with).
    Every step costs the teacher 2 extra evaluations per guided row (4 with guidance)."""
    teacher = teacher if callable(teacher) and not isinstance(teacher, (str, Path)) else _as_module(teacher)
    ds = _as_pairs(pairs)
    net = _student(student, init)
    ds = _fit_labels(ds, net)
    if guidance is None:
        guidance = (getattr(ds, "info", None) or {}).get("guidance")
    obj = SlimFlowObjective(net, teacher, guide_weight=guide_weight, loss=loss, t_range=t_range,
                            intermediate=intermediate, perceptual=perceptual, guidance=guidance)
    info = {"method": "slimflow", "pairs": ds.name, "pairs_nfe": int(getattr(ds, "total_nfe", 0)),
            "guide_weight": float(guide_weight), "guidance": guidance,
            "teacher_nfe_per_row": 2 if guidance is None else 4}
    extra = _extra(train_kw, info)
    return train(obj, ds, steps=steps, out=out, extra_config=extra, **train_kw)


@torch.no_grad()
def make_pairs(model: Callable, n: int, solver: str = "rk4", steps: int = 32, labels: Any = None,
               guidance: Optional[float] = None, seed: int = 0, shape: Optional[Sequence[int]] = None,
               batch_size: int = 4096, dtype: torch.dtype = torch.float32, path: Any = "linear") -> PairDataset:
    """In-memory teacher pairs ``(x0, ODE(x0)[, y])`` (for files, resume and torchrun use
    :func:`straightflow.straighten.pairs.generate_pairs`). ``labels``: None, ``"cycle"``
    (``i mod num_classes``) or an integer tensor (n,); ``guidance``: CFG scale. The returned
    dataset's ``total_nfe`` attribute is the velocity evaluations spent (per row, times n)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    shp = sample_shape(model, shape)
    num_classes = getattr(model, "num_classes", None)
    y: Optional[Tensor] = None
    if isinstance(labels, str):
        if labels != "cycle":
            raise ValueError(f"labels must be None, 'cycle' or an integer tensor, got {labels!r}")
        if not num_classes:
            raise ValueError("labels='cycle' needs a class-conditional model (model.num_classes)")
        y = torch.arange(n) % int(num_classes)
    elif labels is not None:
        y = torch.as_tensor(labels).long().reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"labels has {y.shape[0]} entries for n = {n}")
    if guidance is not None and y is None:
        raise ValueError("guidance needs labels ('cycle' or a tensor)")
    x0, _ = initial_noise((n, *shp), seed, dtype=dtype)
    x1s, nfe = [], 0
    for i in range(0, n, batch_size):
        cond = None if y is None else {"y": y[i:i + batch_size]}
        r = sample(model, x0[i:i + batch_size], solver=solver, steps=steps, guidance=guidance, cond=cond, path=path)
        x1s.append(r.x.to(dtype))
        nfe += r.nfe * r.x.shape[0]
    ds = PairDataset(x0, torch.cat(x1s), y=y, num_classes=int(num_classes) if y is not None else None,
                     name=f"pairs:{solver}{steps}" + (f"-cfg{guidance:g}" if guidance is not None else ""))
    ds.total_nfe = nfe  # type: ignore[attr-defined]
    ds.info = {"solver": solver, "steps": steps, "guidance": guidance, "n": n, "total_nfe": nfe}  # type: ignore
    return ds


@dataclass
class ConditionalOnestepResult:
    """Stages of :func:`conditional_onestep`: the guided teacher pairs, the 2-RF run, the pairs
    the student was distilled on, and the one-step student run (``student.model``)."""

    teacher_pairs: PairDataset
    reflow: TrainResult
    distill_pairs: PairDataset
    student: TrainResult

    @property
    def total_nfe(self) -> int:
        """Velocity evaluations spent generating pairs (teacher + 2-RF), summed over rows."""
        return int(getattr(self.teacher_pairs, "total_nfe", 0)) + (
            int(getattr(self.distill_pairs, "total_nfe", 0)) if self.distill_pairs is not self.teacher_pairs else 0)


def conditional_onestep(teacher: Callable, n_pairs: int, guidance: float, *, reflow_model: Optional[nn.Module] = None,
                        reflow_steps: int = 2000, distill_steps: int = 2000, solver: str = "rk4",
                        teacher_steps: int = 32, distill_from: str = "reflow", seed: int = 0,
                        reflow_fn: Optional[Callable[..., TrainResult]] = None,
                        reflow_kw: Optional[Dict[str, Any]] = None, distill_kw: Optional[Dict[str, Any]] = None,
                        out: Optional[FilePath] = None) -> ConditionalOnestepResult:
    """InstaFlow-style conditional straightening with class labels.

    1. Pairs from the class-conditional ``teacher`` with classifier-free guidance ``guidance``
       (labels cycle through the classes): ``x1 = ODE_{CFG}(x0, y)``.
    2. 2-RF: a model taking ``y`` (``reflow_model``, default a copy of the teacher) trained on those
       pairs by reflow -- it learns the *guided* flow, so it samples without guidance.
       ``reflow_fn(model, pairs, steps, **reflow_kw) -> TrainResult`` replaces the plain
       ``Flow(coupling="pairs")`` training (e.g. the improved reflow of ``straighten.reflow``).
    3. One-step distillation (k = 1) of the 2-RF, initialised from it, on pairs from the 2-RF
       (``distill_from="reflow"``, InstaFlow) or on the teacher's pairs (``"teacher"``).
       The student samples with ``straightflow.sample(student, x0, steps=1, cond={"y": y})``: NFE 1.
    """
    from ..flow import Flow

    if distill_from not in ("reflow", "teacher"):
        raise ValueError(f"distill_from must be 'reflow' or 'teacher', got {distill_from!r}")
    if getattr(teacher, "null_class", None) is None or not getattr(teacher, "num_classes", None):
        raise ValueError("conditional straightening needs a class-conditional teacher with a null class "
                         "(model.num_classes and model.null_class) for classifier-free guidance")
    out_dir = None if out is None else Path(out)
    pairs = make_pairs(teacher, n_pairs, solver=solver, steps=teacher_steps, labels="cycle",
                       guidance=guidance, seed=seed)
    if reflow_model is None:
        if not isinstance(teacher, nn.Module):
            raise ValueError("the teacher is not an nn.Module; pass reflow_model= (a class-conditional network)")
        reflow_model = copy.deepcopy(teacher)
    if getattr(reflow_model, "num_classes", None) is None:
        raise ValueError("reflow_model must be class-conditional (num_classes) to take the labels")
    reflow_model.train().requires_grad_(True)
    kw = dict(reflow_kw or {})
    kw.setdefault("seed", seed)
    if reflow_fn is not None:
        rf = reflow_fn(reflow_model, pairs, reflow_steps, **kw)
    else:
        flow = Flow(reflow_model, coupling="pairs", loss=kw.pop("loss", "mse"), time_dist=kw.pop("time_dist", "uniform"))
        rf = train(flow, pairs, steps=reflow_steps, out=None if out_dir is None else out_dir / "reflow", **kw)
    if distill_from == "reflow":
        dpairs = make_pairs(rf.model, n_pairs, solver=solver, steps=teacher_steps,
                            labels=pairs.y, seed=seed + 1)
        dpairs.num_classes = pairs.num_classes
    else:
        dpairs = pairs
    dkw = dict(distill_kw or {})
    dkw.setdefault("seed", seed)
    st = distill(dpairs, init=rf.model, k=1, steps=distill_steps,
                 out=None if out_dir is None else out_dir / "student", **dkw)
    return ConditionalOnestepResult(pairs, rf, dpairs, st)
