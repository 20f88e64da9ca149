"""Partial fine-tuning: freeze the embeddings and the bottom N blocks (depth from `models.anatomy`)."""

from __future__ import annotations

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods.base import MethodContext, MethodRuntime
from tuneforge.models.anatomy import param_depth


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    k = run.method.freeze_layers
    run.method.check_model(ctx.n_layers)
    for name, p in model.named_parameters():
        depth = param_depth(name, ctx.n_layers)
        frozen = (depth == 0 and run.method.freeze_embeddings) or (1 <= depth <= k)
        p.requires_grad_(name in ctx.head_names or not frozen)
    return model


METHOD = MethodRuntime(apply=apply)
