"""BitFit as a tuneforge method (paper and rationale in ``config.py``).

Saving writes only what trained, the biases and the head (``bitfit_model.safetensors``, a few hundred KB
for MiniLM instead of 90 MB), in the adapter-only spirit of the other parameter-efficient methods; `load`
copies them onto a freshly loaded base. `merge` is the identity: the trained biases are the model's own
parameters, so the loaded model already is a plain transformers model (``save_pretrained`` it to get a
self-contained folder).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.engine.checkpoint import trainable_state
from tuneforge.errors import ConfigError
from tuneforge.methods._reference import swap_reference
from tuneforge.methods.base import MethodContext, MethodRuntime, Reference
from tuneforge.methods.bitfit.config import BitFitConfig, no_bias_message

__all__ = ["MULTI_UNSUPPORTED", "WEIGHTS_FILE", "apply", "is_bias", "load", "merge", "reference", "save"]

WEIGHTS_FILE = "bitfit_model.safetensors"
MULTI_UNSUPPORTED = (
    "BitFit trains the model's own biases and head in place: two saved folders are two values of the same "
    "tensors, so they cannot both sit on one base (load each folder as its own model)"
)


def is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def _biases_only(model: nn.Module, model_name: str, extra: set[str]) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    names = [n for n, _ in model.named_parameters()]
    if not any(n.startswith(prefix + ".") for n in names):  # no base-model prefix (EncoderDecoderModel): all of it
        prefix = ""
    backbone_biases = [n for n in names if is_bias(n) and (not prefix or n.startswith(prefix + "."))]
    if not backbone_biases:
        raise ConfigError(no_bias_message(model_name, type(model.base_model).__name__), key="method")
    for name, p in model.named_parameters():
        p.requires_grad_(is_bias(name) or name in extra)
    return model


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    return _biases_only(model, str(run.model.name), ctx.head_names)


def save(model: nn.Module, folder: Path) -> None:
    """Write every trainable tensor (biases + head) to ``folder/bitfit_model.safetensors``."""
    save_file(trainable_state(model), str(Path(folder) / WEIGHTS_FILE), metadata={"format": "pt"})


def load(base: nn.Module, folder: Path, cfg: BitFitConfig) -> nn.Module:
    """Inverse of `save` on a freshly loaded base."""
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    model = _biases_only(base, str(folder), set(tensors))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    absent = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if unknown or absent:
        raise ValueError(f"{folder}/{WEIGHTS_FILE} does not match the model: unknown {unknown[:5]}, "
                         f"missing {absent[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return model


def merge(model: nn.Module) -> nn.Module:
    """BitFit changes the model's own biases: the trained model already is the merged model."""
    return model


def reference(model: nn.Module) -> Reference:
    """The base: the biases and head as they are now (snapshotted; swapped in inside the context)."""
    return swap_reference(model)


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge=merge, reference=reference,
                       multi_unsupported=MULTI_UNSUPPORTED)
