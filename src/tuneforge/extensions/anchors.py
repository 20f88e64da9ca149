"""The weights a forgetting cure holds on to: each trainable weight with its starting value, and the head.

L2-SP and EWC both pull trainable weights back toward where training started. `anchors` splits the
trainable parameters of the method-applied model, at ``on_train_start`` (the starting weights, also on
``--resume``, see `extensions.base`):

* anchored: every trainable weight except the task head, with a copy of its starting value: the pretrained
  weight under full fine-tuning, BitFit's biases, ...; for the weights a method adds, the method's initial
  value (LoRA's B and the adapters' up-projections start at 0, IA3's scales at 1: "no change"), so only what
  trains is copied (``w0`` costs nothing for frozen weights);
* head: the task head (a fresh classifier, peft's ``modules_to_save`` copies): new weights, no anchor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Anchors", "anchors"]


@dataclass
class Anchors:
    """Trainable parameters split as described in the module docstring (names as in the live model)."""

    anchored: list[tuple[str, nn.Parameter, torch.Tensor]] = field(default_factory=list)
    head: list[tuple[str, nn.Parameter]] = field(default_factory=list)


def anchors(model: nn.Module, head_names: Any) -> Anchors:
    """Split ``model``'s trainable parameters into anchored (with a detached copy now) and head."""
    out = Anchors()
    heads = set(head_names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name in heads:
                out.head.append((name, p))
            else:
                out.anchored.append((name, p, p.detach().clone()))
    return out
