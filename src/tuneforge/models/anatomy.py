"""Where a parameter sits in a model: embeddings, transformer layer k, or the top (final norm, pooler, head).

Layer-wise LR decay and partial freezing both need a depth per parameter. Hugging Face models name their
blocks ``layer.N`` (BERT), ``layers.N`` (Llama, T5 stacks use ``block.N``) or ``h.N`` (GPT-2); this module
maps names to depths without editing or special-casing model code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["head_parameter_names", "num_layers", "param_depth", "trainable_summary"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|wte|wpe|shared|word_embeddings)(?:\.|$)")


def num_layers(config: Any) -> int:
    """Number of transformer blocks of a HF config (encoder side for encoder-decoders)."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    encoder = getattr(config, "encoder", None)  # EncoderDecoderConfig (bert2bert): the encoder's blocks
    if encoder is not None and hasattr(encoder, "to_dict"):
        return num_layers(encoder)
    raise ValueError(f"cannot find the number of layers in a {type(config).__name__}")


def param_depth(name: str, n_layers: int) -> int:
    """0 for embeddings, ``k + 1`` for block k (0-based, bottom up), ``n_layers + 1`` for the top."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if _EMBED_RE.search(name):
        return 0
    return n_layers + 1


def head_parameter_names(model: nn.Module, newly_initialized: Iterable[str] = ()) -> set[str]:
    """Parameters of the task head: outside the base model, plus any the checkpoint did not provide.

    A head is whatever the pretrained checkpoint cannot supply: the classifier outside
    ``model.base_model``, and base-model weights reported missing at load time (e.g. a BERT pooler that a
    sentence-transformers export dropped). Both must train under every method.
    """
    prefix = getattr(model, "base_model_prefix", "")
    names = {n for n, _ in model.named_parameters()}
    head = {n for n in names if not (prefix and n.startswith(prefix + "."))}
    if head == names:  # no base-model prefix at all: nothing we can call a head by position
        head = set()
    missing = set(newly_initialized)
    head |= {n for n in names if n in missing}
    return head


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once.

    A 4-bit weight (bitsandbytes ``Params4bit``, QLoRA) stores two codes per uint8 element; it counts as
    the number of weights it holds (its ``quant_state.shape``), not as its packed bytes.
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = math.prod(shape) if shape is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
