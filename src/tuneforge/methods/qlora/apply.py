"""QLoRA (Dettmers et al. 2023) runtime: quantise the backbone's linear layers to bitsandbytes NF4 on CPU,
then peft LoRA on top.

Loading through transformers' ``BitsAndBytesConfig`` on CPU left a layer unquantised here and failed in
the forward ("FP4 quantization state not initialized"), while bitsandbytes 0.50 ``Linear4bit`` layers
quantised by moving them to the CPU run forward and backward. So the fp32 model is loaded as usual and each
``nn.Linear`` / GPT-2 ``Conv1D`` outside the task head is swapped for a ``Linear4bit`` (NF4, optional double
quantisation) carrying the original weights; the model is flagged ``is_loaded_in_4bit`` so peft puts its
4-bit-aware LoRA layers on them. The same swap after loading the fp32 base rebuilds the identical base
(quantisation is deterministic), so only the adapter is saved. bitsandbytes' fused bf16 CPU inference
kernel is switched off per layer (see `quantize`), so evaluation computes exactly what training did.

Merge dequantises the NF4 weights to fp32 layers of the original types, re-attaches the trained adapter
with peft and folds it in: the result is a plain fp32 model equal to the trained QLoRA model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.methods._peft import (
    head_modules,
    linear_modules,
    load_adapter,
    peft_activate,
    peft_attach,
    peft_reference,
    read_peft_config,
    save_adapter,
    wrap,
)
from tuneforge.methods.base import MethodContext, MethodRuntime
from tuneforge.methods.lora.apply import peft_lora_config
from tuneforge.methods.qlora.config import BNB_INSTALL

__all__ = ["apply", "attach", "base_kind", "dequantize", "load", "merge", "quantize", "save"]

_CONV1D_ATTR = "_tuneforge_conv1d_layers"  # paths that were GPT-2 Conv1D before quantisation


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"method 'qlora' needs bitsandbytes: {BNB_INSTALL}", key="method") from None
    return bnb


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize(model: nn.Module, exclude: list[str], double_quant: bool, compute_dtype: str) -> int:
    """Swap every linear layer outside ``exclude`` (and the architecture's keep-in-fp32 modules) for an NF4
    ``Linear4bit``; returns how many were swapped."""
    from transformers.pytorch_utils import Conv1D

    bnb = _bnb()
    dtype = getattr(torch, compute_dtype)
    # layers the architecture keeps in full precision (T5's "wo": its FFN casts activations to wo's dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    conv1d: set[str] = set()
    n = 0
    for path, layer in linear_modules(model, exclude).items():
        if isinstance(layer, bnb.nn.Linear4bit) or any(f".{k}." in f".{path}." for k in keep):
            continue
        is_conv = isinstance(layer, Conv1D)
        weight = layer.weight.detach()
        weight = weight.T.contiguous() if is_conv else weight  # Conv1D stores (in, out)
        out_f, in_f = weight.shape
        q = bnb.nn.Linear4bit(in_f, out_f, bias=layer.bias is not None, compute_dtype=dtype,
                              compress_statistics=double_quant, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight.float(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4")
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        q = q.to(weight.device)  # bitsandbytes quantises a Params4bit when it is moved to a device
        # bitsandbytes repacks weights in eval mode for a fused bf16 CPU kernel that fails on layers narrower
        # than its 64-wide block and computes in bf16 whatever compute_dtype says; keep eval = train math.
        q.support_avx512bf16_for_cpu = False
        _set(model, path, q)
        if is_conv:
            conv1d.add(path)
        n += 1
    setattr(model, _CONV1D_ATTR, getattr(model, _CONV1D_ATTR, set()) | conv1d)
    model.is_loaded_in_4bit = True  # peft then uses its bitsandbytes-aware LoRA layers
    return n


def dequantize(model: nn.Module) -> None:
    """Replace every ``Linear4bit`` with an fp32 ``nn.Linear`` (or ``Conv1D``, as before quantisation)."""
    from transformers.pytorch_utils import Conv1D

    bnb = _bnb()
    conv1d = getattr(model, _CONV1D_ATTR, set())
    for path, layer in list(model.named_modules()):
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        bias = layer.bias.detach().float() if layer.bias is not None else None
        if path in conv1d:
            new: nn.Module = Conv1D(w.shape[0], w.shape[1])
            new.weight.data = w.T.contiguous()
            new.bias.data = bias if bias is not None else torch.zeros(w.shape[0], device=w.device)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            new.weight.data = w
            if bias is not None:
                new.bias.data = bias
        _set(model, path, new.requires_grad_(False))
    for attr in (_CONV1D_ATTR, "is_loaded_in_4bit"):
        if hasattr(model, attr):
            delattr(model, attr)


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    cfg = run.method
    quantize(model, head_modules(model, ctx.head_names), cfg.double_quant, cfg.compute_dtype)
    return wrap(model, peft_lora_config(model, cfg, ctx), ctx)


def save(model: nn.Module, folder: Path) -> None:
    save_adapter(model, folder)


def load(base_model: nn.Module, folder: Path, method_cfg: Any) -> nn.Module:
    from peft import PeftConfig

    heads = PeftConfig.from_pretrained(folder).modules_to_save or []
    quantize(base_model, list(heads), method_cfg.double_quant, method_cfg.compute_dtype)
    return load_adapter(base_model, folder)


def base_kind(double_quant: bool, compute_dtype: str) -> str:
    """The base a qlora adapter expects, as `peft_attach` compares them (adapters share one quantised base)."""
    return f"a 4-bit NF4 base (double_quant={double_quant}, compute_dtype={compute_dtype})"


def attach(model: nn.Module, folder: Path, name: str) -> nn.Module:
    """`peft_attach` on a base quantised as the folder's manifest says: the first attach quantises the plain
    base (as `load` does); later ones must have been trained with the same quantisation options."""
    from tuneforge.methods.saved import METHOD_FILE, read_manifest

    manifest = read_manifest(folder)
    if manifest is None or manifest.get("method") != "qlora":
        raise ValueError(f"{folder} is not a saved qlora folder (no {METHOD_FILE} naming qlora)")
    options = manifest["options"]
    double_quant, compute_dtype = bool(options["double_quant"]), str(options["compute_dtype"])
    config = read_peft_config(folder)
    heads = list(config.modules_to_save or [])
    return peft_attach(model, folder, name, config=config, base=base_kind(double_quant, compute_dtype),
                       prepare=lambda m: quantize(m, heads, double_quant, compute_dtype))


def merge(model: nn.Module) -> nn.Module:
    """A plain fp32 model: dequantised base + the LoRA update folded in (see module docstring)."""
    import peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    state = get_peft_model_state_dict(model, adapter_name=name)
    base = model.unload()
    conv1d = getattr(base, _CONV1D_ATTR, set())
    dequantize(base)
    config.fan_in_fan_out = bool(conv1d) and set(config.target_modules) <= conv1d
    fresh = peft.get_peft_model(base, config, adapter_name=name)
    set_peft_model_state_dict(fresh, state, adapter_name=name)
    with torch.no_grad():
        return fresh.merge_and_unload()


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge=merge, reference=peft_reference,
                       attach=attach, activate=peft_activate)
