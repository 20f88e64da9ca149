"""The last encoder layer computes only the first token, where the classification head reads nothing else.

Why: a BERT-family sequence classifier (BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT, MiniLM) reads the last
layer's output at position 0 alone (the pooler's ``[CLS]``, RoBERTa's ``<s>``). The other positions of the last
layer need their keys and values (position 0 attends to them) but nothing else: their queries, attention
outputs, output projection, feed-forward block and layer norms are computed and thrown away. In the last of
MiniLM-L6's six layers that is 10 of 12 weight matrices' worth of work per token, ~14% of the model's matmuls
in training and prediction. No library does this for training (transformers computes every position); it is
our own short forward, built from the layer's own submodules (so LoRA-wrapped or otherwise swapped linears
and dropouts are the ones that run).

What: `use_first_token_last_layer` gives the last layer of such a model a forward that, while
`first_token_only` is active, computes ``q`` for position 0, ``k``/``v`` for all positions (the same masked
attention, the same attention-probability dropout), then the layer's output block for position 0 and returns
``[B, 1, H]``. Outside that context (extensions' own forwards, hidden-state features, anything else), with a
key/value cache or prefix (prefix tuning, P-tuning v2) or cross-attention, the layer runs its own forward.

Numbers: the logits and every gradient equal the full layer's to float rounding (``tests/unit/test_first_token.py``,
training mode with dropout off). With dropout, the last layer's hidden-state dropouts draw masks for one position
instead of all, so later draws of the random stream differ (the same dropout, like ``train.fast_dropout``).
``train.first_token_last_layer: false`` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["first_token_only", "use_first_token_last_layer"]

# Heads that read position 0 of the last hidden state and nothing else (pooler / ClassificationHead).
_HEADS = {"BertForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
          "ElectraForSequenceClassification", "CamembertForSequenceClassification"}


class _Active(threading.local):
    on = False  # per thread: a server may run other models' forwards on other threads


_ACTIVE = _Active()


@contextlib.contextmanager
def first_token_only(enabled: bool = True) -> Iterator[None]:
    """While active, a patched last layer returns position 0 only (the classification objective's forwards)."""
    before = _ACTIVE.on
    _ACTIVE.on = enabled
    try:
        yield
    finally:
        _ACTIVE.on = before


def _plain_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # peft wrappers
    return get() if callable(get) else model


def _last_layer(model: nn.Module) -> nn.Module | None:
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    att = getattr(last, "attention", None)
    ok = (att is not None and all(hasattr(att.self, n) for n in ("query", "key", "value", "dropout", "scaling",
                                                                 "attention_head_size", "config"))
          and hasattr(att, "output") and hasattr(last, "feed_forward_chunk")
          and not getattr(last, "is_decoder", True) and not getattr(last, "add_cross_attention", True)
          and getattr(last, "chunk_size_feed_forward", 1) == 0)
    return last if ok else None


def use_first_token_last_layer(model: nn.Module) -> bool:
    """Patch the last layer of ``model`` (in place, no new weights) when its head reads position 0 only; returns
    whether it applied."""
    plain = _plain_model(model)
    if type(plain).__name__ not in _HEADS:
        return False
    last = _last_layer(plain)
    if last is None:
        return False
    if not isinstance(last, FirstTokenLayer):
        last.__class__ = _patched_class(type(last))
    return True


class FirstTokenLayer:
    """Mixed into the last layer's class by `use_first_token_last_layer` (see module docstring)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (not _ACTIVE.on or args or encoder_hidden_states is not None or kwargs.get("past_key_values") is not None
                or kwargs.get("output_attentions")):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
        sa = self.attention.self
        first = hidden_states[:, :1]
        batch, length = hidden_states.shape[:2]
        d = sa.attention_head_size
        q = sa.query(first).view(batch, 1, -1, d).transpose(1, 2)
        k = sa.key(hidden_states).view(batch, length, -1, d).transpose(1, 2)
        v = sa.value(hidden_states).view(batch, length, -1, d).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
            attention_mask = attention_mask[:, :, :1]
        attn, _ = _attention(sa)(sa, q, k, v, attention_mask, dropout=sa.dropout.p if sa.training else 0.0,
                                 scaling=sa.scaling)
        out = self.attention.output(attn.reshape(batch, 1, -1), first)
        return self.feed_forward_chunk(out)


def _attention(sa: nn.Module) -> Any:
    """The attention function the model was configured with (sdpa, eager, ...), as its own layer would call it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    eager = getattr(sys.modules[type(sa).__module__], "eager_attention_forward", eager_attention_forward)
    return ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager)


@functools.cache
def _patched_class(layer_cls: type) -> type:
    return type(layer_cls.__name__, (FirstTokenLayer, layer_cls), {"__module__": __name__})
