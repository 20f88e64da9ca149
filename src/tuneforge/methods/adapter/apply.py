"""Bottleneck adapters as a tuneforge method: wrap, save, load (see ``layer.py`` for the what and why).

Training: the whole backbone is frozen; the adapters and the task head (plus any weight the checkpoint
did not provide, e.g. a pooler) train. Saving writes only those trained tensors
(``adapter_model.safetensors``); `load` rebuilds the adapters on a freshly loaded base from the options
in the manifest and copies them back, checking that the names match exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.engine.checkpoint import trainable_state
from tuneforge.methods._reference import hooks_reference
from tuneforge.methods.adapter.config import AdapterConfig
from tuneforge.methods.adapter.layer import ATTR, adapter_set, attach
from tuneforge.methods.base import MethodContext, MethodRuntime, Reference

__all__ = ["MERGE_UNSUPPORTED", "MULTI_UNSUPPORTED", "WEIGHTS_FILE", "apply", "load", "reference", "save", "wrap"]

WEIGHTS_FILE = "adapter_model.safetensors"
MERGE_UNSUPPORTED = (
    "bottleneck adapters add non-linear modules (down-projection, activation, up-projection) on the hidden "
    "states; they cannot be folded into the model's linear weights, so the adapted model is its own form"
)
MULTI_UNSUPPORTED = (
    "bottleneck adapters are forward hooks of one AdapterSet per model and each saved folder also holds its "
    "own trained task head in the model's head parameters; a second folder would replace both, not sit "
    "beside them (serve one model per adapter folder, or use lora/ia3 for several adapters on one base)"
)


def wrap(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze ``model`` and add adapters (trainable) as ``cfg`` says; the head is left frozen here."""
    for p in model.parameters():
        p.requires_grad_(False)
    attach(model, style=cfg.style, bottleneck_for=cfg.bottleneck_for, non_linearity=cfg.non_linearity,
           dropout=cfg.dropout)
    return model


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    wrap(model, run.method)
    for name, p in model.named_parameters():
        if name in ctx.head_names:
            p.requires_grad_(True)
    return model


def save(model: nn.Module, folder: Path) -> None:
    """Write the adapters and the head (every trainable tensor) to ``folder/adapter_model.safetensors``."""
    if adapter_set(model) is None:
        raise ValueError("this model has no bottleneck adapters to save")
    save_file(trainable_state(model), str(Path(folder) / WEIGHTS_FILE), metadata={"format": "pt"})


def load(base: nn.Module, folder: Path, cfg: AdapterConfig) -> nn.Module:
    """Inverse of `save`: adapters on ``base`` with the saved adapter and head weights (trainable again)."""
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    model = wrap(base, cfg)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    absent = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if unknown or absent:
        raise ValueError(f"{folder}/{WEIGHTS_FILE} does not match the adapters built from its manifest: "
                         f"unknown {unknown[:5]}, missing {absent[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
            params[name].requires_grad_(True)
    return model


def reference(model: nn.Module) -> Reference:
    """The base: adapter hooks switched off, and the head (trainable, outside the adapters) as it was now."""
    aset = adapter_set(model)
    if aset is None:
        raise ValueError("this model has no bottleneck adapters")
    return hooks_reference(model, lambda m: aset.disabled(),
                           keep=lambda name, p: p.requires_grad and f".{ATTR}." not in f".{name}")


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge_unsupported=MERGE_UNSUPPORTED,
                       reference=reference, multi_unsupported=MULTI_UNSUPPORTED)
