"""Attention within each packed document on CPU (``train.packed_attention``): one causal call per document.

Why: rows packed with ``task.packing=documents`` carry restarting ``position_ids``, from which transformers
builds a block-diagonal causal mask [B, 1, S, S] that keeps each document to itself, and SDPA then runs over
every (query, key) pair of the row: torch's CPU flash-attention kernel takes keys in blocks of 512 and skips
only blocks wholly above the diagonal, so a row of 512 tokens costs the full 512 x 512 square whatever the mask
says. The work that matters is each document against itself, ``sum(L_i^2)`` instead of ``S^2``: for SmolLM2
SFT rows of ~2.5 documents, forward and backward of one layer's attention took 47 ms with the mask and 29 ms
this way (`benchmarks/README.md`).

What: the same attention (each token attends to the tokens before it in its own document; Vaswani et al. 2017)
as one causal ``scaled_dot_product_attention`` per document over views of the row (the query/key/value
tensors are split along the sequence, so autograd joins the gradients with one concatenation), grouped
query heads passed through with ``enable_gqa``. A token alone in its document (padding: position 0) attends
only to itself, so its output is its own value, with no call. The segments are where ``position_ids`` does
not step by one, which is how transformers builds the mask; the mask it passes is compared once with the
per-document causal mask those segments give, and anything else (padding masks, sliding windows, a mask that
differs) goes to transformers' function, as do dropout on the probabilities, caches, soft-capping and
attention biases. Outputs equal the masked call's to float rounding (``tests/unit/test_packed_attention.py``).
Under ``train.compile`` the function runs eagerly between the compiled parts of each block: traced, the plan
cache failed dynamo's own guard, and a plan (a Python list that differs from batch to batch) would recompile.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["document_plan", "sdpa_by_document"]

_UNSUPPORTED = ("position_bias", "cache", "softcap", "output_attentions", "sliding_window", "s_aux")


class _Plans(threading.local):
    """The plan for the last mask seen (per thread): every layer of one forward gets the same mask tensor."""

    mask: weakref.ref | None = None
    version = -1
    plan: list[tuple[int, bool]] | None = None


_LAST = _Plans()


def document_plan(position_ids: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[int, bool]] | None:
    """The rows' documents in order as ``(length, alone)`` pieces over the flattened [B * S] positions (runs
    of one-token documents merged into one piece with ``alone``), or None when ``mask`` is not the
    per-document causal mask of ``position_ids``."""
    if mask is None or mask.dtype != torch.bool or position_ids.dim() != 2:
        return None
    b, s = position_ids.shape
    if tuple(mask.shape) != (b, 1, s, s):
        return None
    pos = position_ids.to("cpu", torch.int64)
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    segment = starts.cumsum(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril_()
    expected = (segment[:, :, None] == segment[:, None, :]) & causal
    if not torch.equal(mask[:, 0].to("cpu"), expected):
        return None
    plan: list[tuple[int, bool]] = []
    for row in segment:
        for n in torch.unique_consecutive(row, return_counts=True)[1].tolist():
            if n == 1 and plan and plan[-1][1]:
                plan[-1] = (plan[-1][0] + 1, True)
            else:
                plan.append((n, n == 1))
    return plan


def _cached_plan(position_ids: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[int, bool]] | None:
    if mask is None:
        return None
    if _LAST.mask is not None and _LAST.mask() is mask and _LAST.version == mask._version:
        return _LAST.plan
    plan = document_plan(position_ids, mask)
    _LAST.mask, _LAST.version, _LAST.plan = weakref.ref(mask), mask._version, plan
    return plan


@torch.compiler.disable  # eager under `train.compile`: the plan cache and the per-document loop are Python
def sdpa_by_document(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> torch.Tensor | None:
    """transformers' attention-function arguments in, the ``[B, S, heads, d]`` output out, or None where this
    does not apply (module docstring) and the caller falls back to transformers' function."""
    position_ids = kwargs.get("position_ids")
    if (position_ids is None or query.device.type != "cpu" or (module.training and dropout > 0)
            or kwargs.get("is_causal") is False or not getattr(module, "is_causal", True)
            or any(kwargs.get(k) for k in _UNSUPPORTED) or getattr(module, "sliding_window", None)):
        return None
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    if key.shape[2] != s or value.shape[2] != s or heads % kv_heads or tuple(position_ids.shape) != (b, s):
        return None
    plan = _cached_plan(position_ids, attention_mask)
    if plan is None:
        return None
    lengths = [n for n, _ in plan]
    queries = query.transpose(1, 2).reshape(b * s, heads, d).split(lengths)
    keys = key.transpose(1, 2).reshape(b * s, kv_heads, key.shape[-1]).split(lengths)
    values = value.transpose(1, 2).reshape(b * s, kv_heads, value.shape[-1]).split(lengths)
    group = heads // kv_heads
    out = []
    for (_, alone), q, k, v in zip(plan, queries, keys, values, strict=True):
        if alone:  # softmax over one key is 1: the output is the value
            out.append(v.repeat_interleave(group, dim=1) if group > 1 else v)
            continue
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           is_causal=True, scale=scaling, enable_gqa=group > 1)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out).view(b, s, heads, value.shape[-1])
