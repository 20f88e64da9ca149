"""Attention-probability dropout with `engine.fast_dropout` masks on CPU (part of ``train.fast_dropout``).

Why: with dropout on the attention probabilities (BERT-family models train with p = 0.1), torch's CPU
``scaled_dot_product_attention`` cannot use its fused kernel and runs its composite math path with a
``bernoulli_`` mask. Measured on MiniLM-L6 shapes (batch 32, 12 heads, 24 tokens, head size 32), forward and
backward of one layer's attention took 4.3 ms that way and 2.5-2.7 ms written out here with a
`fast_dropout.keep_mask` (2.2-2.4 ms without dropout at all): for a 6-layer model, several ms of a ~165 ms step.

What: `cpu_training_attention` puts `sdpa_with_fast_dropout` in place of transformers' ``"sdpa"`` attention
function (``ALL_ATTENTION_FUNCTIONS``, the registry transformers documents for custom attention) while the
training loop computes a loss, and puts the original back after (with ``train.packed_attention``, packed rows
go to `engine.packed_attention` first). It computes the same attention (Vaswani et al.
2017): ``softmax(q k^T * scaling + mask)``, inverted dropout (Srivastava et al. 2014) on the probabilities with
a 16-bit-draw mask, then ``@ v``. It takes over only in training, on CPU, with dropout > 0 and equal query and
key/value heads and no extra bias or cache; everything else goes to transformers' own function unchanged.
The dropout is the same as `FastDropout`'s: keep probability rounded to 2^-16 and another random stream than
torch's; without dropout the outputs equal SDPA's to float rounding (``tests/unit/test_fast_attention.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tuneforge.engine.fast_dropout import fast_dropout
from tuneforge.engine.packed_attention import sdpa_by_document

__all__ = ["cpu_training_attention", "sdpa_with_fast_dropout"]


def _sdpa() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def sdpa_with_fast_dropout(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention function (same arguments, ``[B, T, heads, d]`` output) with the
    probability dropout written out on CPU (module docstring)."""
    if (not 0.0 < dropout < 1.0 or not module.training or query.device.type != "cpu"
            or key.shape[1] != query.shape[1] or any(kwargs.get(k) is not None for k in ("position_bias", "cache"))
            or kwargs.get("softcap") or kwargs.get("output_attentions")):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    scores = torch.matmul(query, key.transpose(-2, -1)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, :kv_len]
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    elif causal:  # upper-left aligned, as SDPA's is_causal
        upper = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(upper, float("-inf"))
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def _training_sdpa(fast_dropout: bool, by_document: bool) -> Any:
    """The attention function installed while a loss is computed: per-document attention for packed rows
    (`engine.packed_attention`) where it applies, else the written-out dropout, else transformers' own."""
    if not by_document:
        return sdpa_with_fast_dropout

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = sdpa_by_document(module, query, key, value, attention_mask, **kwargs)
        if out is not None:
            return out, None
        return (sdpa_with_fast_dropout if fast_dropout else _sdpa())(module, query, key, value, attention_mask,
                                                                     **kwargs)

    return attention


@contextlib.contextmanager
def cpu_training_attention(fast_dropout: bool = True, by_document: bool = False) -> Iterator[None]:
    """While active, transformers models configured with ``sdpa`` attention use `sdpa_with_fast_dropout`
    (``fast_dropout``) and, for packed rows, `packed_attention.sdpa_by_document` (``by_document``)."""
    if not (fast_dropout or by_document):
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, before = "sdpa" in local, local.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _training_sdpa(fast_dropout, by_document)
    try:
        yield
    finally:
        if had:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)
