"""Language-model metrics: next-token negative log-likelihood and perplexity.

Perplexity is ``exp(total NLL / number of predicted tokens)`` over a whole evaluation set (token-weighted,
not a mean of per-batch means), so it does not depend on how rows were batched or packed. Labels follow
the Hugging Face convention: aligned with ``input_ids`` (the shift happens here) and ``-100`` where no
loss is taken (padding, prompt tokens, the first token of each packed document).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "perplexity", "shifted_nll"]

IGNORE_INDEX = -100


def shifted_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL, number of scored tokens) of predicting ``labels[:, t + 1]`` from ``logits[:, t]``.

    ``logits`` is [B, T, V], ``labels`` [B, T]. The same quantity as transformers' ``ForCausalLMLoss``
    before it divides by the count.
    """
    targets = labels[:, 1:].reshape(-1)
    scores = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(scores, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def perplexity(mean_nll: float) -> float:
    """``exp(mean NLL)``, as ``inf`` rather than an overflow error for a diverged model."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf
