"""Prefix-tuning (Li & Liang 2021) runtime (also used by ``ptuning_v2``): peft ``PrefixTuningConfig`` on the model's task type.

Prefixes cannot be folded into weights, so merge is unsupported; a run exports as a self-contained folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.methods._peft import load_adapter, save_adapter, wrap_prompt_learning
from tuneforge.methods.base import MethodContext, MethodRuntime

__all__ = ["MERGE_UNSUPPORTED", "apply", "apply_prefix", "load", "save"]

MERGE_UNSUPPORTED = "prefix key/values are extra attention inputs, not a change of weights"


PROJECTION_LR_RATIO = float(os.environ.get("TF_RATIO", "0.03"))


def _scale_reparameterisation(model: nn.Module, ratio: float) -> None:
    """Make the prefix MLP (embedding + two linears of every peft ``PrefixEncoder``) train at ``ratio`` times
    the run's learning rate, keeping its function, parameter names and saved format.

    Each parameter is stored as ``theta / ratio`` and used as ``ratio * theta``. Adam's step is invariant to
    the gradient's scale, so the stored value moves by ~lr per step and the used one by ``ratio * lr``: the
    same as a parameter group at ``ratio * lr`` (the engine's groups are by layer depth and decay, and a
    method has no say in them). Decoupled weight decay is relative to the value, so it is unchanged.
    """
    import torch
    import torch.nn.functional as F
    from peft.tuners.prefix_tuning import PrefixEncoder

    class _SlowPrefixEncoder(PrefixEncoder):
        def forward(self, prefix: torch.Tensor) -> torch.Tensor:
            r, (lin1, act, lin2) = self.lr_ratio, self.transform
            x = F.embedding(prefix, self.embedding.weight * r)
            x = act(F.linear(x, lin1.weight * r, lin1.bias * r))
            return F.linear(x, lin2.weight * r, lin2.bias * r)

    for enc in model.modules():
        if isinstance(enc, PrefixEncoder) and enc.prefix_projection and hasattr(enc, "transform"):
            with torch.no_grad():
                for p in enc.parameters():
                    p.div_(ratio)
            enc.__class__ = _SlowPrefixEncoder
            enc.lr_ratio = ratio


def apply_prefix(model: nn.Module, ctx: MethodContext, method: str, num_virtual_tokens: int, projection: bool,
                 projection_hidden: int | None) -> nn.Module:
    """Wrap ``model`` with trained prefixes (``projection``: through an MLP of width ``projection_hidden``,
    trained at ``PROJECTION_LR_RATIO`` times the learning rate of the head; see `PrefixConfig` for why)."""
    import peft

    def make(tt: str, heads: list[str] | None) -> Any:
        kw = {"encoder_hidden_size": projection_hidden} if projection else {}
        return peft.PrefixTuningConfig(task_type=tt, num_virtual_tokens=num_virtual_tokens,
                                       prefix_projection=projection, modules_to_save=heads, **kw)

    wrapped = wrap_prompt_learning(model, make, ctx, method)
    if projection:
        _scale_reparameterisation(wrapped, PROJECTION_LR_RATIO)
    return wrapped


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    m = run.method
    return apply_prefix(model, ctx, "prefix", m.num_virtual_tokens, m.projection, m.projection_hidden)


def save(model: nn.Module, folder: Path) -> None:
    save_adapter(model, folder)


def load(base_model: nn.Module, folder: Path, method_cfg: Any) -> nn.Module:
    return load_adapter(base_model, folder)


from tuneforge.methods._peft import peft_activate, peft_attach, peft_reference  # noqa: E402

METHOD = MethodRuntime(apply=apply, save=save, load=load, merge_unsupported=MERGE_UNSUPPORTED,
                       reference=peft_reference, attach=peft_attach, activate=peft_activate)
