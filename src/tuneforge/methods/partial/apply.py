"""Partial fine-tuning: freeze the embeddings and the bottom N blocks (depth from `models.anatomy`)."""

from __future__ import annotations

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods._reference import copy_reference
from tuneforge.methods.base import MethodContext, MethodRuntime, Reference
from tuneforge.models.anatomy import param_depth

MULTI_UNSUPPORTED = (
    "partial fine-tuning saves a whole transformers model (trained top blocks + head), not an adapter folder "
    "with a manifest; two runs differ in whole blocks, so there is no shared base to attach to (load each "
    "saved folder as its own model)"
)


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    k = run.method.freeze_layers
    run.method.check_model(ctx.n_layers)
    for name, p in model.named_parameters():
        depth = param_depth(name, ctx.n_layers)
        frozen = (depth == 0 and run.method.freeze_embeddings) or (1 <= depth <= k)
        p.requires_grad_(name in ctx.head_names or not frozen)
    return model


def reference(model: nn.Module) -> Reference:
    """A frozen deep copy made now (the top blocks and the head may have changed during training): costs one more model in memory."""
    return copy_reference(model)


METHOD = MethodRuntime(apply=apply, reference=reference, multi_unsupported=MULTI_UNSUPPORTED)
