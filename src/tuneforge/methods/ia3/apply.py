"""(IA)^3 (Liu et al. 2022) runtime: peft ``IA3Config`` + ``get_peft_model`` on resolved module paths; merge multiplies the
scales into the weights (peft ``merge_and_unload``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.methods._peft import (
    head_modules,
    linear_modules,
    load_adapter,
    merge_peft,
    peft_activate,
    peft_attach,
    peft_reference,
    resolve_targets,
    save_adapter,
    task_type,
    wrap,
)
from tuneforge.methods.base import MethodContext, MethodRuntime
from tuneforge.methods.ia3.config import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS

__all__ = ["apply", "load", "merge", "save"]


def _defaults() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    return {**PEFT_TARGETS, **DEFAULT_TARGETS}, {**PEFT_FF, **DEFAULT_FEEDFORWARD}


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    import peft
    from transformers.pytorch_utils import Conv1D

    cfg = run.method
    heads = head_modules(model, ctx.head_names)
    targets_table, ff_table = _defaults()
    targets = resolve_targets(model, cfg.target_modules, targets_table, heads)
    if cfg.target_modules is None:
        ff = resolve_targets(model, None, ff_table, heads, key="method.feedforward_modules")
    elif cfg.feedforward_modules is None:
        ff = []
    else:
        ff = resolve_targets(model, cfg.feedforward_modules, {}, heads, key="method.feedforward_modules")
    outside = sorted(set(ff) - set(targets))
    if outside:
        raise ConfigError(f"{', '.join(outside)} are not among the target modules; feed-forward modules must be "
                          "a subset of method.target_modules", key="method.feedforward_modules")
    linear = linear_modules(model, heads)
    pc = peft.IA3Config(
        task_type=task_type(model), target_modules=targets, feedforward_modules=ff,
        fan_in_fan_out=all(isinstance(linear[t], Conv1D) for t in targets), modules_to_save=heads or None,
    )
    return wrap(model, pc, ctx)


def save(model: nn.Module, folder: Path) -> None:
    save_adapter(model, folder)


def load(base_model: nn.Module, folder: Path, method_cfg: Any) -> nn.Module:
    return load_adapter(base_model, folder)


def merge(model: nn.Module) -> nn.Module:
    return merge_peft(model)


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge=merge, reference=peft_reference,
                       attach=peft_attach, activate=peft_activate)
