"""P-tuning v2 (Liu et al. 2022) runtime: prefix tuning without the reparameterisation MLP (see ``methods.prefix.apply``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods._peft import (
    load_adapter,
    peft_activate,
    peft_attach,
    peft_reference,
    save_adapter,
)
from tuneforge.methods.base import MethodContext, MethodRuntime
from tuneforge.methods.prefix.apply import apply_prefix

__all__ = ["MERGE_UNSUPPORTED", "apply", "load", "save"]

MERGE_UNSUPPORTED = "deep prompts are extra attention inputs at every layer, not a change of weights"


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    return apply_prefix(model, ctx, "ptuning_v2", run.method.num_virtual_tokens, projection=False,
                        projection_hidden=None)


def save(model: nn.Module, folder: Path) -> None:
    save_adapter(model, folder)


def load(base_model: nn.Module, folder: Path, method_cfg: Any) -> nn.Module:
    return load_adapter(base_model, folder)


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge_unsupported=MERGE_UNSUPPORTED,
                       reference=peft_reference, attach=peft_attach, activate=peft_activate)
