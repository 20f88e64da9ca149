"""Cheaper dropout masks on CPU (``train.fast_dropout``): one 64-bit random draw per four elements.

torch's CPU dropout draws its mask with ``bernoulli_``, one Mersenne-Twister draw and a comparison in double
precision per element, serially: 5 ns per element here, 12-14% of a MiniLM fine-tuning step (the largest
cost after the matmuls, `benchmarks/README.md`). This mask takes 16 random bits per element from
``random_`` on int64 (a quarter of the draws) and compares them with an integer threshold: 3x faster for a
(32, 14, 384) activation (0.32 ms vs 0.97 ms).

It is the same dropout (Srivastava et al. 2014, inverted: kept values scaled by ``1 / (1 - p)``) with the
keep probability rounded to a multiple of 2^-16 (0.9 -> 0.899994) and a different random stream: the same
seed gives a different (equally random) mask than torch's. Draws come from torch's default generator, so
``train.seed`` and the checkpointed RNG state make runs reproducible and resumable as before. Only
``nn.Dropout`` modules on CPU are swapped (the hidden-state dropout of every transformers model); the
dropout on attention probabilities inside transformers' sdpa attention gets the same masks through
`engine.fast_attention`; on CUDA (whose Philox kernel is already fast) dropout stays torch's. Tests:
``tests/unit/test_fast_dropout.py``, ``tests/unit/test_fast_attention.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FastDropout", "drop_positions", "fast_dropout", "keep_mask", "use_fast_dropout"]

_LOW, _HIGH = -(2**63), 2**63 - 1  # random_(low, high): every bit of each int64 random


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The boolean keep mask (probability ``1 - p``) for ``x``'s shape, from 16-bit integer draws."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(_LOW, _HIGH)
    keep_below = round((1.0 - p) * 65536) - 32768  # int16 draws are uniform on [-32768, 32767]
    return bits.view(torch.int16)[:n].view(x.shape) < keep_below


def drop_positions(n: int, p: float, block: int | None = None) -> torch.Tensor:
    """The sorted flat indices that a dropout with drop probability ``p`` drops among ``n`` elements.

    Each element is dropped independently with probability ``p``, as with a mask, but the draws are the gaps
    between dropped elements: ``1 + floor(log(1 - u) / log(1 - p))`` is the geometric distance from one
    dropped element to the next (``P(gap > k) = (1 - p)^k``), so a dropout of ``p = 0.05`` over ``n`` elements
    takes ~``n p`` double-precision uniforms (one 64-bit draw each) instead of ``n / 4`` 64-bit words for a
    16-bit mask, and what a backward needs is ``n p`` indices instead of an ``n``-element mask. Used where the
    dropped elements can be handled by index (`methods.lora.fused`: the LoRA input's dropout, p 0.05 by
    default). Draws come from torch's default CPU generator (seeded, checkpointed), in blocks of ``block``
    uniforms (by default enough to cover ``n`` with overwhelming probability; a further block is drawn when one
    does not); the indices depend only on the stream of uniforms, not on the block size.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"drop_positions needs 0 < p < 1, got {p}")
    if n <= 0:
        return torch.empty(0, dtype=torch.int64)
    log_keep = math.log1p(-p)
    mean = n * p
    block = block or int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16.0)
    parts: list[torch.Tensor] = []
    start = 0
    while True:
        u = torch.rand(block, dtype=torch.float64)  # in [0, 1): log1p(-u) is finite
        pos = torch.log1p(u.neg_()).div_(log_keep).floor_().to(torch.int64).add_(1).cumsum_(0).add_(start - 1)
        last = int(pos[-1])
        if last >= n:
            parts.append(pos[: int(torch.searchsorted(pos, n))])
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        parts.append(pos)
        start = last + 1


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` with drop probability ``p`` (0 < p < 1) from 16-bit integer draws."""
    return x * keep_mask(x, p).to(x.dtype).mul_(1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with `fast_dropout` masks on CPU in training; torch's own elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return fast_dropout(x, self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` of ``model`` for `FastDropout` in place (same ``p``, no weights);
    returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = FastDropout
            n += 1
    return n
