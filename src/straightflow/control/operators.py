"""Linear measurement operators ``y = A x + sigma_y * eps`` for image inverse problems.

Every operator maps images ``(B, C, H, W)`` to measurements and provides

- ``A(x)`` (``forward``), ``A.adjoint(y)`` (``A^T y``, exact: ``<A x, y> = <x, A^T y>``),
- ``A.pinv(y)`` (Moore-Penrose ``A^+ y``; closed form where one exists, otherwise from the SVD of
  the dense matrix with singular values below ``rcond * s_max`` dropped),
- ``A.project(x, y) = x - A^+ (A x - y)``: the point of the consistency set ``{A x = y}`` nearest
  to ``x`` (for an ``A`` truncated by ``rcond``: nearest on the retained subspace); idempotent,
- ``A.measure(x, sigma_y, generator)``: a noisy measurement.

Operators (:data:`OPERATORS`): ``inpaint_box`` (a centred box hidden), ``inpaint_random``
(a fixed random pixel set hidden), ``sr2`` / ``sr4`` (``f x f`` average pooling), ``deblur``
(separable Gaussian kernel of given ``sigma`` and ``size``, zero padding, same-size output).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Registry

__all__ = ["Operator", "BoxInpaint", "RandomInpaint", "SuperResolution", "GaussianBlur", "OPERATORS",
           "make_operator", "available"]

OPERATORS: Registry = Registry("operator")


class Operator:
    """Base class: subclasses define ``forward``, ``adjoint`` and, when closed-form, ``pinv``."""

    name = "operator"
    rcond = 1e-3
    exact_pinv = False  # True where A^+ is a closed form with no truncation (masks, average pooling)

    def __init__(self, shape: Tuple[int, int, int]) -> None:
        c, h, w = (int(s) for s in shape)
        self.shape = (c, h, w)
        self._dense: Dict[Tuple, Tuple[Tensor, Tensor]] = {}

    # -- interface
    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.forward(x)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name}: expected images (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")

    def measure(self, x: Tensor, sigma: float = 0.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """``y = A x + sigma * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``."""
        y = self(x)
        if sigma > 0:
            dev = generator.device if generator is not None else y.device
            y = y + float(sigma) * torch.randn(y.shape, generator=generator, dtype=y.dtype, device=dev).to(y.device)
        return y

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense ``(m, n)`` matrix of ``A`` (columns = ``A`` applied to the standard basis)."""
        n = self.shape[0] * self.shape[1] * self.shape[2]
        eye = torch.eye(n, dtype=dtype).reshape(n, *self.shape)
        return self.forward(eye).reshape(n, -1).T.contiguous()

    def pinv(self, y: Tensor) -> Tensor:
        """``A^+ y`` from the truncated SVD of the dense matrix (cached per dtype/device)."""
        key = (y.dtype, str(y.device))
        if key not in self._dense:
            m = self.matrix(torch.float64)
            p = torch.linalg.pinv(m, rtol=self.rcond)
            self._dense[key] = (m.to(y.device, y.dtype), p.to(y.device, y.dtype))
        p = self._dense[key][1]
        b = y.shape[0]
        return (y.reshape(b, -1) @ p.T).reshape(b, *self.shape)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """``x - A^+ (A x - y)``: nearest point of ``{A x = y}`` (hard data consistency)."""
        return x - self.pinv(self(x) - y)

    def residual(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image ``||A x - y||^2``, shape ``(B,)``."""
        return (self(x) - y).pow(2).flatten(1).sum(1)

    def config(self) -> Dict[str, object]:
        return {"name": self.name, "shape": list(self.shape)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class _Mask(Operator):
    """``A x = m * x`` with a fixed 0/1 mask ``m`` (1 = observed): ``A = A^T = A^+``, a projection."""

    mask: Tensor
    exact_pinv = True

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.device, x.dtype)

    def adjoint(self, y: Tensor) -> Tensor:
        return y * self.mask.to(y.device, y.dtype)

    def pinv(self, y: Tensor) -> Tensor:
        return self.adjoint(y)


@OPERATORS.register("inpaint_box", aliases=("box",))
class BoxInpaint(_Mask):
    """Box inpainting: a centred ``fraction x fraction`` box of every channel is hidden."""

    name = "inpaint_box"

    def __init__(self, shape: Tuple[int, int, int], fraction: float = 0.5) -> None:
        super().__init__(shape)
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"inpaint_box: fraction must be in (0, 1), got {fraction}")
        c, h, w = self.shape
        bh, bw = max(1, round(h * fraction)), max(1, round(w * fraction))
        top, left = (h - bh) // 2, (w - bw) // 2
        m = torch.ones(self.shape)
        m[:, top:top + bh, left:left + bw] = 0.0
        self.fraction, self.box = float(fraction), (top, left, bh, bw)
        self.mask = m

    def config(self):
        return {**super().config(), "fraction": self.fraction, "box": list(self.box)}


@OPERATORS.register("inpaint_random", aliases=("random",))
class RandomInpaint(_Mask):
    """Random inpainting: a fixed random set of pixels (all channels) is hidden with probability ``p``."""

    name = "inpaint_random"

    def __init__(self, shape: Tuple[int, int, int], p: float = 0.7, seed: int = 0) -> None:
        super().__init__(shape)
        if not 0.0 < float(p) < 1.0:
            raise ValueError(f"inpaint_random: p (fraction hidden) must be in (0, 1), got {p}")
        c, h, w = self.shape
        keep = (torch.rand((1, h, w), generator=torch.Generator().manual_seed(int(seed))) >= p).float()
        self.p, self.seed = float(p), int(seed)
        self.mask = keep.expand(c, h, w).contiguous()

    def config(self):
        return {**super().config(), "p": self.p, "seed": self.seed}


class SuperResolution(Operator):
    """``f``x super-resolution: ``A x = avg_pool(x, f)`` (``f x f`` block means).

    ``A^T y = nearest_upsample(y) / f^2``; ``A A^T = I / f^2`` so ``A^+ y = nearest_upsample(y)``.
    """

    exact_pinv = True

    def __init__(self, shape: Tuple[int, int, int], factor: int = 2) -> None:
        super().__init__(shape)
        f = int(factor)
        if f < 1 or self.shape[1] % f or self.shape[2] % f:
            raise ValueError(f"super-resolution x{factor}: image size {self.shape[1]}x{self.shape[2]} is not divisible by {factor}")
        self.factor = f
        self.name = f"sr{f}"

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    def _up(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def adjoint(self, y: Tensor) -> Tensor:
        return self._up(y) / (self.factor ** 2)

    def pinv(self, y: Tensor) -> Tensor:
        return self._up(y)

    def config(self):
        return {**super().config(), "factor": self.factor}


OPERATORS.register("sr2")(lambda shape, **kw: SuperResolution(shape, factor=2, **kw))
OPERATORS.register("sr4")(lambda shape, **kw: SuperResolution(shape, factor=4, **kw))


@OPERATORS.register("deblur", aliases=("blur", "gaussian_blur"))
class GaussianBlur(Operator):
    """Gaussian blur with a separable kernel ``k_i ∝ exp(-(i - c)^2 / (2 sigma^2))`` (``size`` taps,
    normalised to sum 1), zero padding, same-size output. ``A`` is symmetric (``A^T`` is the
    transposed convolution); ``A^+`` is the truncated-SVD pseudo-inverse (``rcond``)."""

    name = "deblur"

    def __init__(self, shape: Tuple[int, int, int], sigma: float = 1.0, size: int = 5, rcond: float = 0.1) -> None:
        super().__init__(shape)
        if float(sigma) <= 0:
            raise ValueError(f"deblur: sigma must be > 0, got {sigma}")
        if int(size) < 1 or int(size) % 2 == 0:
            raise ValueError(f"deblur: size must be an odd positive int, got {size}")
        r = torch.arange(int(size), dtype=torch.float64) - (int(size) - 1) / 2
        k = torch.exp(-r ** 2 / (2 * float(sigma) ** 2))
        self.kernel1d = k / k.sum()
        self.sigma, self.size, self.rcond = float(sigma), int(size), float(rcond)

    def _weights(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        k = self.kernel1d.to(x.device, x.dtype)
        c = self.shape[0]
        return k.reshape(1, 1, 1, -1).expand(c, 1, 1, self.size), k.reshape(1, 1, -1, 1).expand(c, 1, self.size, 1)

    def forward(self, x: Tensor) -> Tensor:
        kh, kv = self._weights(x)
        p = self.size // 2
        x = F.conv2d(x, kh, padding=(0, p), groups=self.shape[0])
        return F.conv2d(x, kv, padding=(p, 0), groups=self.shape[0])

    def adjoint(self, y: Tensor) -> Tensor:
        kh, kv = self._weights(y)
        p = self.size // 2
        y = F.conv_transpose2d(y, kv, padding=(p, 0), groups=self.shape[0])
        return F.conv_transpose2d(y, kh, padding=(0, p), groups=self.shape[0])

    def config(self):
        return {**super().config(), "sigma": self.sigma, "size": self.size, "rcond": self.rcond}


def make_operator(name: str, shape: Tuple[int, int, int], **kwargs) -> Operator:
    """Build a registered operator by name for images of ``shape = (C, H, W)``."""
    return OPERATORS.get(name)(tuple(shape), **kwargs)


def available() -> list:
    return OPERATORS.names()
