"""QAT under LoRA (``method: lora`` with ``qat: {weight_bits, group_size}``): the frozen base computes as the
deployed integer model will, LoRA trains.

* ``prepare_base``: before peft wraps the model, every backbone linear layer QAT would quantise (`apply.targets`:
  not the head, an output embedding or layers the architecture keeps in fp32) becomes torchao's
  ``FakeQuantizedLinear`` (int8 dynamic per-token activations, int4/int8 weights), exactly as ``method: qat``
  prepares it; peft then wraps the ones LoRA targets (``FakeQuantizedLinear`` is an ``nn.Linear``).
* `QatLoraLinear` (`swap_lora_layers`): each wrapped layer computes ``F.linear(fq_act(x), fq_w(W + s·BA))``:
  the LoRA update is merged into the weight *before* the weight's fake quantisation (gradients reach A and B
  through torchao's straight-through rounding). This differs from torchtune's QAT+LoRA, where the base weight
  alone is fake-quantised and the adapters add ``s·BA·x`` in high precision: there the deployed model
  (merge, then quantise) rounds ``W + s·BA`` again, and an update smaller than a quantisation step can
  vanish; here training sees the rounding the deployed model does, so the fake-quantised model *equals*
  torchao's post-training quantisation of the merged weights at every step (the test oracle). The price: the
  dense ``W + s·BA`` is formed every forward pass (as DoRA does), and LoRA dropout has no separate branch to
  act on (refused at config validation). Non-target layers are plain ``FakeQuantizedLinear`` (frozen).
* ``convert``: merge LoRA (peft ``merge_and_unload``), then torchao's QAT convert step on the same layers:
  real int weights. ``load`` does the same from a saved adapter folder on the fp32 base, so ``tuneforge
  eval`` / ``predict`` / ``serve`` compute with the converted model; `apply.merge` (``tuneforge merge``)
  then writes its dequantised weights as plain ``nn.Linear`` layers.
* ``fake_quant(model, False)`` (`apply.fake_quant`) turns the rounding off: ``W + s·BA`` in fp32, i.e. plain
  LoRA; the reference of DPO/KTO/PPO and distillation is the base with adapters *and* fake quantisation off
  (the fp32 base, as for ``method: qat``).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.methods.base import Reference
from tuneforge.methods.qat import apply as qat
from tuneforge.methods.qat.config import QatOptions, no_linear_message

__all__ = ["QatLoraLinear", "convert", "layers_of", "load", "prepare_base", "reference", "save_layers",
           "swap_lora_layers"]


class QatLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` over a ``FakeQuantizedLinear`` base, fake-quantising ``W + s·BA`` (module docstring).

    Adapters off, merged, or a mixed-adapter batch: peft's own forward (the base layer alone is then the
    fake-quantised base)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fq = self.base_layer
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        w = fq.weight
        for a in active:
            w = w + self.get_delta_weight(a)
        if fq.activation_fake_quantizer is not None:
            x = fq.activation_fake_quantizer(x)
        if fq.weight_fake_quantizer is not None:
            w = fq.weight_fake_quantizer(w)
        return F.linear(x.to(w.dtype), w, fq.bias)


def prepare_base(model: nn.Module, opts: QatOptions, head_names: set[str], model_name: str) -> list[str]:
    """Fake-quantise the backbone's linear layers of the (unwrapped) model in place; returns their paths."""
    layers = qat.targets(model, head_names)
    if not layers:
        raise ConfigError(no_linear_message(f"{model_name} ({type(model).__name__})"), key="method.qat")
    try:
        qat.prepare(model, opts, layers)
    except ConfigError as e:
        raise ConfigError(str(e).replace("method.group_size", "method.qat.group_size"),
                          key="method.qat.group_size") from None
    return layers


def swap_lora_layers(model: nn.Module) -> int:
    """Make every peft LoRA ``Linear`` whose base is fake-quantised a `QatLoraLinear` (same state, same
    parameter names: peft's save, merge and adapter switching see an ordinary LoRA layer); returns how many."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    n = 0
    for m in model.modules():
        if type(m) is LoraLinear and isinstance(m.base_layer, FakeQuantizedLinear):
            m.__class__ = QatLoraLinear
            n += 1
    return n


def layers_of(model: nn.Module) -> list[str] | None:
    """The quantised layer paths recorded on a QAT-under-LoRA model (peft-wrapped or not), else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, qat._LAYERS_ATTR, None)


def convert(model: nn.Module, opts: QatOptions) -> nn.Module:
    """A converted copy: LoRA merged into the fake-quantised base, then torchao's convert step (int weights)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        merged = out.merge_and_unload()
    return qat.convert(merged, opts)


def save_layers(model: nn.Module, folder: Path) -> None:
    """``qat.json`` beside the adapter: the quantised layers, so ``load`` quantises exactly those."""
    import torchao

    (Path(folder) / qat.LAYERS_FILE).write_text(json.dumps(
        {"layers": layers_of(model), "torchao": torchao.__version__}, indent=1), encoding="utf-8")


def load(peft_model: nn.Module, folder: Path, opts: QatOptions) -> nn.Module:
    """The converted model from an adapter loaded on the fp32 base: merge, then quantise the saved layers."""
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    return qat.load(merged, folder, opts)


def reference(model: nn.Module, peft_reference: Any) -> Reference:
    """peft's reference (adapters off, the head's original module) with fake quantisation off: the fp32 base."""
    inner = peft_reference(model)

    @contextlib.contextmanager
    def fp32_base() -> Iterator[nn.Module]:
        with inner() as base, qat.fake_quant(base, enabled=False):
            yield base

    return fp32_base
