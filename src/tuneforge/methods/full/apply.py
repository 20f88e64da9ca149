"""Full fine-tuning: make every parameter trainable."""

from __future__ import annotations

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods.base import MethodContext, MethodRuntime


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


METHOD = MethodRuntime(apply=apply)
