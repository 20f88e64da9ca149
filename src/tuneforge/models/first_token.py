"""Sequence classification with BERT-style encoders: the last layer computes the one token the head reads.

The classification heads of BERT, RoBERTa, XLM-R, ELECTRA and their kin read the final hidden state of the
first token ([CLS], ``<s>``) and nothing else. In the last encoder layer every other position's query,
attention row, output projection, feed-forward block and LayerNorm are computed and thrown away; only that
layer's keys and values need every position. `enable_first_token_last_layer` swaps the last layer's class for
a subclass whose ``forward`` computes the first token only (keys and values from all tokens, the attention
mask's first row), so the encoder's output is [batch, 1, hidden], which the heads slice at position 0 as
before. That saves about 10/12 of one layer's work per token: a sixth of MiniLM-L6's encoder.

The output is the same number (the same operations on the rows that are used), and the swap is attested
on the model as the training method wrapped it: on the first batch, the logits of the swapped and the
unswapped model are compared in eval mode and fp32 (no dropout, no random numbers drawn), and the swap is
undone unless they agree. Layers whose structure is not BERT's (``attention.self.query/key/value``,
``attention.output``, ``feed_forward_chunk``), cross-attention or a key/value cache (prefix tuning) keep
the original ``forward``. Tests: ``tests/unit/test_first_token.py`` (logits and every gradient equal to the
unswapped model's for BERT and RoBERTa, with LoRA, refusals).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["enable_first_token_last_layer", "last_encoder_layer"]

_SUBCLASSES: dict[type, type] = {}


def _is_bert_layer(module: nn.Module) -> bool:
    attn = getattr(getattr(module, "attention", None), "self", None)
    return (all(hasattr(attn, n) for n in ("query", "key", "value", "attention_head_size", "scaling", "dropout"))
            and hasattr(getattr(module, "attention", None), "output") and hasattr(module, "feed_forward_chunk"))


def _sequence_classifier(model: Any) -> nn.Module | None:
    """The transformers ``*ForSequenceClassification`` model that ``model`` is (through a DDP or peft
    wrapper), else None: a multi-task view shares its encoder with heads that read every token."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    ok = isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForSequenceClassification")
    return model if ok else None


def last_encoder_layer(model: Any) -> nn.Module | None:
    """The last BERT-structured layer of the encoder of ``model`` (a sequence classifier, possibly wrapped),
    or None (another architecture, a decoder, not a sequence classifier of its own)."""
    model = _sequence_classifier(model)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return None
    found = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_is_bert_layer(m) for m in module):
            found = module[-1]
    return found


def _first_token_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         encoder_hidden_states: torch.Tensor | None = None, *args: Any,
                         past_key_values: Any = None, **kwargs: Any) -> torch.Tensor:
    """The original layer's output at position 0 only, as [batch, 1, hidden]."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.pytorch_utils import apply_chunking_to_forward

    if encoder_hidden_states is not None or past_key_values is not None or args:
        return super(type(self), self).forward(hidden_states, attention_mask, encoder_hidden_states, *args,
                                               past_key_values=past_key_values, **kwargs)
    attn = self.attention.self
    batch, tokens = hidden_states.shape[:2]
    size = attn.attention_head_size
    first = hidden_states[:, :1]
    query = attn.query(first).view(batch, 1, -1, size).transpose(1, 2)
    key = attn.key(hidden_states).view(batch, tokens, -1, size).transpose(1, 2)
    value = attn.value(hidden_states).view(batch, tokens, -1, size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[:, :, :1]
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    kwargs.pop("encoder_attention_mask", None)
    out, _ = interface(attn, query, key, value, attention_mask, dropout=attn.dropout.p if attn.training else 0.0,
                       scaling=attn.scaling, **kwargs)
    attention_output = self.attention.output(out.reshape(batch, 1, -1).contiguous(), first)
    return apply_chunking_to_forward(self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim,
                                     attention_output)


def _swapped(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"FirstToken{cls.__name__}", (cls,), {"forward": _first_token_forward})
    return _SUBCLASSES[cls]


@torch.no_grad()
def enable_first_token_last_layer(model: nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Swap ``model``'s last encoder layer for the first-token one when its logits on ``inputs`` (one batch)
    agree with the full layer's; returns whether the swap is in place."""
    layer = last_encoder_layer(model)
    if layer is None or "input_ids" not in inputs:
        return False
    original = type(layer)
    if original in _SUBCLASSES.values():
        return True
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(inputs["input_ids"].device.type, enabled=False):  # fp32: bf16 noise would blur it
            full = model(**inputs).logits
            layer.__class__ = _swapped(original)
            try:
                fast = model(**inputs).logits
            except Exception:  # any failure means the structure is not BERT's after all: keep the full layer
                fast = None
    finally:
        model.train(was_training)
    scale = float(full.abs().max())
    if fast is None or fast.shape != full.shape or float((fast - full).abs().max()) > 1e-4 * scale + 1e-5:
        layer.__class__ = original
        return False
    return True
