"""Full fine-tuning: make every parameter trainable."""

from __future__ import annotations

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods._reference import copy_reference
from tuneforge.methods.base import MethodContext, MethodRuntime, Reference

MULTI_UNSUPPORTED = (
    "full fine-tuning saves a whole transformers model (every weight), not an adapter folder with a manifest; "
    "two runs are two models, so there is no shared base to attach to (load each saved folder as its own model)"
)


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def reference(model: nn.Module) -> Reference:
    """A frozen deep copy made now (every weight may have changed during training): costs one more model in memory."""
    return copy_reference(model)


METHOD = MethodRuntime(apply=apply, reference=reference, multi_unsupported=MULTI_UNSUPPORTED)
