"""Prefix-tuning (Li & Liang 2021) runtime (also used by ``ptuning_v2``): peft ``PrefixTuningConfig`` on the model's task type.

Prefixes cannot be folded into weights, so merge is unsupported; a run exports as a self-contained folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods._peft import load_adapter, save_adapter, wrap_prompt_learning
from tuneforge.methods.base import MethodContext, MethodRuntime

__all__ = ["MERGE_UNSUPPORTED", "apply", "apply_prefix", "load", "save"]

MERGE_UNSUPPORTED = "prefix key/values are extra attention inputs, not a change of weights"


def apply_prefix(model: nn.Module, ctx: MethodContext, method: str, num_virtual_tokens: int, projection: bool,
                 projection_hidden: int | None) -> nn.Module:
    """Wrap ``model`` with trained prefixes (``projection``: through an MLP of width ``projection_hidden``)."""
    import peft

    def make(tt: str, heads: list[str] | None) -> Any:
        kw = {"encoder_hidden_size": projection_hidden} if projection else {}
        return peft.PrefixTuningConfig(task_type=tt, num_virtual_tokens=num_virtual_tokens,
                                       prefix_projection=projection, modules_to_save=heads, **kw)

    return wrap_prompt_learning(model, make, ctx, method)


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    m = run.method
    return apply_prefix(model, ctx, "prefix", m.num_virtual_tokens, m.projection, m.projection_hidden)


def save(model: nn.Module, folder: Path) -> None:
    save_adapter(model, folder)


def load(base_model: nn.Module, folder: Path, method_cfg: Any) -> nn.Module:
    return load_adapter(base_model, folder)


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge_unsupported=MERGE_UNSUPPORTED)
