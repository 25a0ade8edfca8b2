"""TarFlow: a normalizing flow of causal-transformer autoregressive blocks (Zhai et al. 2024,
"Normalizing Flows are Capable Generative Models").

The data ``x`` becomes tokens ``(B, T, D)`` (:mod:`.tokens`). Block ``k`` (``k = 0 .. K-1``, data to
noise) reads the tokens in its own order (reversed for odd ``k``, so the direction alternates) and is
the affine autoregressive map

    z_0 = x_0,    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),    i = 1 .. T-1,

with ``(alpha_i, mu_i)`` read off a causal transformer run on ``x_0 .. x_{i-1}`` (its output projection
starts at zero, so every block starts as the identity). Its log-determinant is
``log|det dz/dx| = - sum_i sum_d alpha_{i,d}``. With a standard Gaussian prior the exact log-likelihood is

    log p(x) = sum_k logdet_k  -  |z|^2 / 2  -  (T D / 2) log(2 pi).

Training is exact maximum likelihood on noise-augmented data ``x + sigma eps`` (``noise_std = sigma``;
plus uniform dequantisation noise when ``levels`` is set). Sampling inverts the blocks from the prior,
token by token (``x_i = mu_i + exp(alpha_i) z_i``, a causal key/value cache: ``T - 1`` transformer calls
per block), or with GS-Jacobi (:mod:`.jacobi`); then the denoising step of the paper,
``x <- x + sigma^2 grad_x log p(x)``, with the score from the model's own likelihood (autograd).

Class conditioning adds a learned class embedding to every token; class ``num_classes`` is the null
class (labels dropped in training), used by classifier-free guidance (:mod:`.guidance`).

STARFlow's deep-shallow design (Gu et al. 2025) is the ``deep_layers`` option: the last block (the one
next to the prior, i.e. the first one sampled) has ``deep_layers`` layers, the others ``layers``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .guidance import guide
from .tokens import check_batch, from_tokens, to_tokens, token_shape
from .transformer import KV, CausalTransformer, extend

__all__ = ["ARBlock", "TarFlow", "bits_per_dim_offset"]


class ARBlock(nn.Module):
    """One affine autoregressive block over ``tokens`` tokens of ``dim`` values (see the module docstring)."""

    def __init__(self, dim: int, tokens: int, width: int, layers: int, heads: int, expansion: int,
                 num_classes: Optional[int], flip: bool) -> None:
        super().__init__()
        self.dim, self.tokens, self.flip, self.num_classes = dim, tokens, flip, num_classes
        self.proj_in = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.cls = nn.Embedding(num_classes + 1, width) if num_classes else None
        if self.cls is not None:
            nn.init.normal_(self.cls.weight, std=0.02)
        self.net = CausalTransformer(width, layers, heads, expansion)
        self.proj_out = nn.Linear(width, 2 * dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.calls = 0  # transformer invocations (for the samplers' reports)

    def order(self, x: Tensor) -> Tensor:
        """Tokens in this block's order (reversed for a flipped block); its own inverse."""
        return x.flip(1) if self.flip else x

    def params(self, xp: Tensor, y: Optional[Tensor], prefix: Optional[KV] = None,
               start: int = 0) -> Tuple[Tensor, Tensor, KV]:
        """``(alpha, mu, kv)`` of positions ``start+1 .. start+L`` from the inputs ``xp`` (block order) at
        positions ``start .. start+L-1``; ``prefix`` holds the keys/values of positions ``< start``."""
        self.calls += 1
        h = self.proj_in(xp) + self.pos[start:start + xp.shape[1]]
        if self.cls is not None:
            if y is None:
                y = torch.full((xp.shape[0],), self.num_classes, dtype=torch.long, device=xp.device)
            h = h + self.cls(y)[:, None]
        h, kv = self.net(h, prefix)
        alpha, mu = self.proj_out(h).chunk(2, dim=-1)
        return alpha, mu, kv

    def step(self, xp: Tensor, y: Optional[Tensor], prefix: Optional[KV], start: int,
             guidance: Optional[float], kind: str) -> Tuple[Tensor, Tensor, KV]:
        """:meth:`params`, guided when ``guidance`` is a scale: the conditional and null-class rows run as
        one doubled batch (``prefix`` is then doubled too) and are combined by :func:`.guidance.guide`."""
        if guidance is None:
            return self.params(xp, y, prefix, start)
        if self.cls is None:
            raise ValueError("guidance needs a class-conditional TarFlow (num_classes > 0)")
        b = xp.shape[0]
        null = torch.full((b,), self.num_classes, dtype=torch.long, device=xp.device)
        cond = null if y is None else y
        a, m, kv = self.params(torch.cat([xp, xp]), torch.cat([cond, null]), prefix, start)
        a, m = guide(a[:b], m[:b], a[b:], m[b:], guidance, kind)
        return a, m, kv

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(z, logdet)``: ``z`` tokens in the natural order, ``logdet = -sum alpha`` per sample."""
        xp = self.order(x)
        alpha, mu, _ = self.params(xp[:, :-1], y)
        z = torch.cat([xp[:, :1], (xp[:, 1:] - mu) * torch.exp(-alpha)], 1)
        return self.order(z), -alpha.sum(dim=(1, 2))

    def inverse(self, z: Tensor, y: Optional[Tensor] = None, guidance: Optional[float] = None,
                kind: str = "tarflow") -> Tensor:
        """Sequential inversion, one token per call with a key/value cache: ``x_i = mu_i + exp(alpha_i) z_i``."""
        zp = self.order(z)
        xs = [zp[:, :1]]
        prefix: Optional[KV] = None
        for i in range(zp.shape[1] - 1):
            a, m, kv = self.step(xs[-1], y, prefix, i, guidance, kind)
            prefix = extend(prefix, kv)
            xs.append(m + torch.exp(a) * zp[:, i + 1:i + 2])
        return self.order(torch.cat(xs, 1))


def bits_per_dim_offset(levels: int) -> float:
    """``-log(Delta)`` in nats per dimension, ``Delta = 2 / (levels - 1)`` the bin width of ``levels``
    integer values mapped onto [-1, 1] (``x = 2 k / (levels - 1) - 1``)."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    return -math.log(2.0 / (levels - 1))


class TarFlow(nn.Module):
    """A TarFlow over samples of ``sample_shape`` (``(C, H, W)`` images or ``(N,)`` vectors).

    ``patch_size``: image patches ``p x p`` (vectors: ``p`` values per token; 1 = one token per
    dimension). ``blocks`` AR blocks of ``layers`` transformer layers of ``width`` channels and ``heads``
    heads (``deep_layers``: the last block's depth, STARFlow's deep block). ``num_classes``: class
    conditioning (None: unconditional). ``noise_std``: the training noise ``sigma`` (and the step of the
    score-based denoising). ``levels``: the data's quantisation (``256`` for 8-bit, ``17`` for the
    digits), which turns on uniform dequantisation in training and sets :meth:`bits_per_dim`'s default.
    """

    def __init__(self, sample_shape: Sequence[int], patch_size: int = 2, blocks: int = 4, width: int = 64,
                 layers: int = 2, heads: int = 4, expansion: int = 4, num_classes: Optional[int] = None,
                 noise_std: float = 0.05, levels: Optional[int] = None, deep_layers: Optional[int] = None) -> None:
        super().__init__()
        if blocks < 1 or layers < 1 or width < 1:
            raise ValueError(f"TarFlow needs blocks, layers and width >= 1, got {blocks}, {layers}, {width}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.patch_size = int(patch_size)
        self.tokens, self.token_dim = token_shape(self.sample_shape, self.patch_size)
        if self.tokens < 2:
            raise ValueError(f"sample shape {self.sample_shape} with patch_size {patch_size} gives one token; "
                             "an autoregressive flow needs at least 2 (use a smaller patch)")
        self.num_classes = int(num_classes) if num_classes else None
        self.null_class = self.num_classes
        self.noise_std, self.levels = float(noise_std), levels
        depths = [int(layers)] * blocks
        if deep_layers:
            depths[-1] = int(deep_layers)
        self.blocks = nn.ModuleList([
            ARBlock(self.token_dim, self.tokens, width, d, heads, expansion, self.num_classes, flip=k % 2 == 1)
            for k, d in enumerate(depths)])
        self.config: Dict[str, Any] = {
            "name": "tarflow", "sample_shape": list(self.sample_shape), "patch_size": self.patch_size,
            "blocks": blocks, "width": width, "layers": layers, "heads": heads, "expansion": expansion,
            "num_classes": self.num_classes, "noise_std": self.noise_std, "levels": levels, "deep_layers": deep_layers}

    @property
    def dim(self) -> int:
        return self.tokens * self.token_dim

    # ------------------------------------------------------------------ likelihood
    def encode(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(z tokens (B, T, D), logdet (B,))`` of data ``x`` (shape checked)."""
        check_batch(x, self.sample_shape)
        h = to_tokens(x, self.patch_size)
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for block in self.blocks:
            h, ld = block(h, y)
            logdet = logdet + ld
        return h, logdet

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(z, logdet)``: the latent in the data's shape and ``log|det dz/dx|`` per sample."""
        z, logdet = self.encode(x, y)
        return from_tokens(z, self.sample_shape, self.patch_size), logdet

    def log_prob(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Exact ``log p(x)`` per sample (nats): ``logdet - |z|^2 / 2 - (n / 2) log(2 pi)``."""
        z, logdet = self.encode(x, y)
        return logdet - 0.5 * z.pow(2).sum(dim=(1, 2)) - 0.5 * self.dim * math.log(2 * math.pi)

    def loss(self, x: Tensor, y: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training NLL in nats per dimension of ``x + U * Delta + sigma * eps`` (the uniform term only
        when ``levels`` is set: ``U ~ U(-1/2, 1/2)``, ``Delta = 2 / (levels - 1)``)."""
        x = x + self.noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if self.levels:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 0.5
            x = x + u * (2.0 / (self.levels - 1))
        return -self.log_prob(x, y).mean() / self.dim

    def bits_per_dim(self, x: Tensor, y: Optional[Tensor] = None, levels: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
        """Bits per dimension of quantised data ``x`` in [-1, 1] (``x = 2 k / (levels - 1) - 1``, ``k``
        integer), per sample, with uniform dequantisation: ``u ~ U(-Delta/2, Delta/2)`` per entry and

            bpd = ( -log p(x + u) - n log(Delta) ) / (n log 2),

        where ``-n log Delta`` is the log-determinant of the map from integer bins (width 1) to [-1, 1]
        (width ``Delta = 2 / (levels - 1)``). One draw of ``u``: an unbiased estimate of an upper bound on
        the discrete code length (Jensen). ``levels`` defaults to the model's (256 if it has none)."""
        lv = int(levels or self.levels or 256)
        delta = 2.0 / (lv - 1)
        u = (torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 0.5) * delta
        nll = -self.log_prob(x + u, y) / self.dim + bits_per_dim_offset(lv)
        return nll / math.log(2)

    # ------------------------------------------------------------------ sampling
    def decode(self, z: Tensor, y: Optional[Tensor] = None, guidance: Optional[float] = None,
               kind: str = "tarflow") -> Tensor:
        """Sequential inversion of every block (prior to data), ``z`` in the data's shape."""
        check_batch(z, self.sample_shape)
        h = to_tokens(z, self.patch_size)
        for block in reversed(self.blocks):
            h = block.inverse(h, y, guidance, kind)
        return from_tokens(h, self.sample_shape, self.patch_size)

    def score(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """``grad_x log p(x)`` by autograd through the exact likelihood."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(xg, y).sum(), xg)
        return g

    def denoise(self, x: Tensor, y: Optional[Tensor] = None, sigma: Optional[float] = None) -> Tensor:
        """TarFlow's score-based denoising (Tweedie): ``x + sigma^2 grad_x log p_sigma(x)`` (``sigma``
        defaults to the training ``noise_std``; 0 returns ``x``)."""
        s = self.noise_std if sigma is None else float(sigma)
        return x if s == 0 else x + s * s * self.score(x, y)

    def calls(self) -> int:
        """Transformer invocations so far, summed over blocks (reset with :meth:`reset_calls`)."""
        return sum(b.calls for b in self.blocks)

    def reset_calls(self) -> None:
        for b in self.blocks:
            b.calls = 0

    def extra_repr(self) -> str:
        c = self.config
        return (f"sample_shape={self.sample_shape}, tokens={self.tokens}x{self.token_dim}, blocks={c['blocks']}, "
                f"width={c['width']}, layers={c['layers']}, deep_layers={c['deep_layers']}")
