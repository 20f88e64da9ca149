"""Prefix-tuning (Li & Liang 2021) runtime (also used by ``ptuning_v2``): peft ``PrefixTuningConfig`` on the model's task type.

Prefixes cannot be folded into weights, so merge is unsupported; a run exports as a self-contained folder.
"""

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
    wrap_prompt_learning,
)
from tuneforge.methods.base import MethodContext, MethodRuntime

__all__ = ["MERGE_UNSUPPORTED", "METHOD", "PROJECTION_LR_RATIO", "apply", "apply_prefix", "load", "lr_scales", "save"]

MERGE_UNSUPPORTED = "prefix key/values are extra attention inputs, not a change of weights"


# Learning rate of the prefix MLP (and its input embedding) relative to the run's rate, which the head gets.
# Measured on MiniLM-L6 / SST-2 (see `PrefixConfig`): one rate for both never learned (majority class at
# 1e-4 .. 3e-2; at 1e-3 the random head barely moves, from 1e-2 Adam blows the MLP's prefixes up), while
# 3e-2 with the MLP at 0.03 of it reached 82.0% dev accuracy (4,000 rows, 1 epoch); 0.1 and 0.01: 58.8%, 62.6%
# (1,000 rows).
PROJECTION_LR_RATIO = 0.03


def lr_scales(model: nn.Module) -> dict[str, float]:
    """The prefix MLP (embedding + two linears of every peft ``PrefixEncoder`` with ``prefix_projection``) trains
    at ``PROJECTION_LR_RATIO`` times the run's rate; the head and everything else at the run's rate."""
    from peft.tuners.prefix_tuning import PrefixEncoder

    out: dict[str, float] = {}
    for name, enc in model.named_modules():
        if isinstance(enc, PrefixEncoder) and enc.prefix_projection:
            out |= {f"{name}.{p}": PROJECTION_LR_RATIO for p, _ in enc.named_parameters()}
    return out


def apply_prefix(model: nn.Module, ctx: MethodContext, method: str, num_virtual_tokens: int, projection: bool,
                 projection_hidden: int | None) -> nn.Module:
    """Wrap ``model`` with trained prefixes (``projection``: through an MLP of width ``projection_hidden``,
    which `lr_scales` trains at ``PROJECTION_LR_RATIO`` times the head's rate; see `PrefixConfig` for why)."""
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


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge_unsupported=MERGE_UNSUPPORTED,
                       reference=peft_reference, attach=peft_attach, activate=peft_activate, lr_scales=lr_scales)
