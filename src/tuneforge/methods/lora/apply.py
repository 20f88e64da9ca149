"""LoRA (Hu et al. 2021) / rsLoRA (Kalajdzievski 2023) / DoRA (Liu et al. 2024) runtime: a thin wrapper
over peft's ``LoraConfig`` + ``get_peft_model``.

Targets resolve to exact module paths of the backbone (see `methods._peft`), the head trains whole via
``modules_to_save``, and the saved folder is a standard peft adapter folder. Merge folds ``(alpha/r)·BA``
(or DoRA's rescaled weight) into the base weights with peft's ``merge_and_unload``.

With ``method.qat`` the base's linear layers are fake-quantised under the adapters and the saved adapter
loads merged and quantised (`tuneforge.methods.qat.lora`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.config.schema import RunConfig
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
from tuneforge.methods.base import MethodContext, MethodRuntime, Reference
from tuneforge.methods.lora.config import DEFAULT_TARGETS
from tuneforge.methods.lora.fused import use_fused_lora
from tuneforge.methods.saved import read_manifest

__all__ = ["apply", "default_targets", "load", "merge", "peft_lora_config", "save"]


def default_targets() -> dict[str, list[str]]:
    """Our per-architecture defaults over peft's table (for architectures we do not list)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    return {**PEFT_TABLE, **DEFAULT_TARGETS}


def peft_lora_config(model: nn.Module, cfg: Any, ctx: MethodContext) -> Any:
    """The peft ``LoraConfig`` for ``model`` and our method options ``cfg`` (lora or qlora)."""
    import peft
    from transformers.pytorch_utils import Conv1D

    heads = head_modules(model, ctx.head_names)
    targets = resolve_targets(model, cfg.target_modules, default_targets(), heads)
    linear = linear_modules(model, heads)
    return peft.LoraConfig(
        task_type=task_type(model),
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores weights as (in, out); peft needs to be told rather than warn and guess
        fan_in_fan_out=all(isinstance(linear[t], Conv1D) for t in targets),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=heads or None,
    )


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    qat = run.method.quantization_aware()
    if qat is None:
        wrapped = wrap(model, peft_lora_config(model, run.method, ctx), ctx)
        if run.method.fused:
            use_fused_lora(wrapped)
        return wrapped
    from tuneforge.methods.qat import lora as qat_lora  # torchao: only for method.qat

    heads = set(ctx.head_names)
    qat_lora.prepare_base(model, qat, heads, str(run.model.name))
    wrapped = wrap(model, peft_lora_config(model, run.method, MethodContext(heads, ctx.n_layers)), ctx)
    qat_lora.swap_lora_layers(wrapped)
    return wrapped


def _qat_layers(model: nn.Module) -> list[str] | None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "_tuneforge_qat_layers", None)


def save(model: nn.Module, folder: Path) -> None:
    save_adapter(model, folder)
    if _qat_layers(model) is not None:
        from tuneforge.methods.qat import lora as qat_lora

        qat_lora.save_layers(model, folder)


def load(base_model: nn.Module, folder: Path, method_cfg: Any) -> nn.Module:
    model = load_adapter(base_model, folder)
    if method_cfg.quantization_aware() is None:
        return model
    from tuneforge.methods.qat import lora as qat_lora

    return qat_lora.load(model, folder, method_cfg.qat)  # merged, then quantised: the converted model


def merge(model: nn.Module) -> nn.Module:
    if not hasattr(model, "merge_and_unload") and _qat_layers(model) is not None:
        from tuneforge.methods.qat import apply as qat

        return qat.merge(model)  # a loaded QAT-under-LoRA run is merged and converted already: dequantise
    return merge_peft(model)


def reference(model: nn.Module) -> Reference:
    if _qat_layers(model) is None:
        return peft_reference(model)
    from tuneforge.methods.qat import lora as qat_lora

    return qat_lora.reference(model, peft_reference)


def attach(model: nn.Module, folder: Path, name: str) -> nn.Module:
    manifest = read_manifest(folder) or {}
    if (manifest.get("options") or {}).get("qat") is not None:
        raise ValueError(f"{folder} was trained with method.qat: it loads merged into its base and quantised, so "
                         "it cannot share a base with other adapters (serve it as its own model)")
    return peft_attach(model, folder, name)


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge=merge, reference=reference,
                       attach=attach, activate=peft_activate)
