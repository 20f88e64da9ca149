"""QAT runtime (Jacob et al. 2018; config and options in ``config.py``): torchao's two-step ``QATConfig``.

* ``apply``: every parameter trains; each ``nn.Linear`` of the backbone becomes torchao's
  ``FakeQuantizedLinear`` (``quantize_(model, QATConfig(base, step="prepare"))``) with ``base`` =
  ``Int8DynamicActivationIntxWeightConfig`` (int8 dynamic per-token activations, int4/int8 symmetric weights
  per group or per channel). Left in fp32: the task head (small, newly initialised, it writes the logits),
  an output embedding (a causal LM's ``lm_head``, usually tied to the input embedding) and layers the
  architecture keeps in fp32 (T5's ``wo``). Parameter names do not change, so checkpoints and resume work as
  for full fine-tuning.
* ``save``: the trained fp32 (master) weights as a plain Hugging Face folder plus ``qat.json``, the list of
  quantised layers; the manifest points at the folder itself (``MethodRuntime.self_contained``). ``load``
  re-applies ``quantize_(model, base)`` to those layers: the converted model. This is exact, not an
  approximation: with torchao 0.18 the converted model *is* torchao's post-training quantisation of the
  trained weights (and its outputs equal the fake-quantised model's; both are tested). A plain folder was
  chosen over ``torch.save`` of the converted tensors because it reloads with any transformers version
  and without pickled torchao classes, and the quantisation takes a second. The converted size is reported
  in the run's ``qat`` block (the int weights + scales, as torch would serialise them).
* ``merge``: a plain transformers fp32 model whose linear weights are the *dequantised* int weights (as
  QLoRA's merge dequantises NF4): the closest plain model to the deployed one; the printed probe difference
  is the activation rounding it no longer does. Quantising it again with the same config gives the same
  int weights.
* ``reference`` (DPO, distillation from the base): a frozen copy of the starting model computing in fp32
  (fake quantisation off), i.e. the base model as loaded, which is also what DPO's precomputed reference
  log-probs come from.

torchao is imported lazily, only for method=qat, under `quiet_torchao` (its import logs optional CUDA
kernels it cannot load on this machine, and torch's pytree a deprecation).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.methods._reference import copy_reference
from tuneforge.methods.base import MethodContext, MethodRuntime, Reference
from tuneforge.methods.qat.config import TORCHAO_INSTALL, QatConfig, group_size_problem, no_linear_message

__all__ = ["LAYERS_FILE", "base_config", "convert", "fake_quant", "load", "merge", "prepare", "quiet_torchao",
           "save", "targets"]

LAYERS_FILE = "qat.json"
_LAYERS_ATTR = "_tuneforge_qat_layers"
_NOISY = ("torchao", "torch.utils._pytree")
MULTI_UNSUPPORTED = (
    "QAT trains every weight of the model: two runs are two models, so there is no shared base to attach to "
    "(load each saved folder as its own model)"
)


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Silence torchao's import-time kernel warnings and torch's pytree deprecation line while inside."""
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torchao() -> Any:
    """The torchao names QAT needs (imported quietly on first use)."""
    try:
        with quiet_torchao():
            from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
            from torchao.quantization.granularity import PerAxis, PerGroup
            from torchao.quantization.qat import QATConfig
            from torchao.quantization.qat.linear import enable_linear_fake_quant
    except ImportError:
        raise ConfigError(f"method 'qat' needs torchao: {TORCHAO_INSTALL}", key="method") from None
    return type("torchao", (), {
        "Base": Int8DynamicActivationIntxWeightConfig, "quantize_": staticmethod(quantize_), "PerAxis": PerAxis,
        "PerGroup": PerGroup, "QATConfig": QATConfig, "enable": staticmethod(enable_linear_fake_quant)})


def base_config(cfg: QatConfig) -> Any:
    """torchao's post-training config that QAT simulates and converts to (the test oracle too)."""
    ao = _torchao()
    granularity = ao.PerAxis(0) if cfg.group_size == "per_channel" else ao.PerGroup(cfg.group_size)
    return ao.Base(weight_dtype=torch.int4 if cfg.weight_bits == 4 else torch.int8, weight_granularity=granularity)


def _quantize(model: nn.Module, config: Any, layers: list[str]) -> None:
    wanted = set(layers)
    with quiet_torchao():
        _torchao().quantize_(model, config, filter_fn=lambda _m, fqn: fqn in wanted)


def targets(model: nn.Module, head_names: set[str]) -> list[str]:
    """Paths of the linear layers QAT quantises: every ``nn.Linear`` but the head, an output embedding and
    layers the architecture keeps in fp32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is out_emb or any(f".{k}." in f".{path}." for k in keep):
            continue
        if any(f"{path}.{p}" in head_names for p, _ in m.named_parameters(recurse=False)):
            continue
        found.append(path)
    return found


def prepare(model: nn.Module, cfg: QatConfig, layers: list[str]) -> nn.Module:
    """Swap ``layers`` for fake-quantised ones (``QATConfig(base, step="prepare")``), in place."""
    problem = None if cfg.group_size == "per_channel" else group_size_problem(
        {p: model.get_submodule(p).in_features for p in layers}, cfg.group_size)
    if problem:
        raise ConfigError(problem, key="method.group_size")
    _quantize(model, _torchao().QATConfig(base_config(cfg), step="prepare"), layers)
    setattr(model, _LAYERS_ATTR, list(layers))
    return model


def convert(model: nn.Module, cfg: QatConfig) -> nn.Module:
    """A converted copy of a prepared model (``QATConfig(base, step="convert")``): real int weights."""
    out = copy.deepcopy(model)
    _quantize(out, _torchao().QATConfig(base_config(cfg), step="convert"), getattr(model, _LAYERS_ATTR))
    return out


@contextlib.contextmanager
def fake_quant(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Inside: the prepared model with its fake quantisation on or off (off = the fp32 master weights)."""
    enable = _torchao().enable
    model.apply(lambda m: enable(m, enabled))
    try:
        yield model
    finally:
        model.apply(lambda m: enable(m, True))


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    layers = targets(model, ctx.head_names)
    if not layers:
        raise ConfigError(no_linear_message(f"{run.model.name} ({type(model).__name__})"), key="method")
    return prepare(model, run.method, layers)


def save(model: nn.Module, folder: Path) -> None:
    """The fp32 master weights (``save_pretrained``) + ``qat.json`` naming the quantised layers."""
    import torchao

    model.save_pretrained(folder)
    (Path(folder) / LAYERS_FILE).write_text(json.dumps(
        {"layers": getattr(model, _LAYERS_ATTR), "torchao": torchao.__version__}, indent=1), encoding="utf-8")


def load(model: nn.Module, folder: Path, cfg: QatConfig) -> nn.Module:
    """The converted model: the saved fp32 weights (``model``) quantised as QAT simulated them."""
    layers = json.loads((Path(folder) / LAYERS_FILE).read_text(encoding="utf-8"))["layers"]
    _quantize(model, base_config(cfg), layers)
    setattr(model, _LAYERS_ATTR, layers)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Plain ``nn.Linear`` layers holding the dequantised int weights (see module docstring)."""
    for path in getattr(model, _LAYERS_ATTR):
        layer = model.get_submodule(path)
        w = layer.weight
        if hasattr(w, "dequantize"):
            layer.weight = nn.Parameter(w.dequantize().to(torch.float32).detach().clone(), requires_grad=False)
    delattr(model, _LAYERS_ATTR)
    return model


def reference(model: nn.Module) -> Reference:
    """A frozen copy of the starting model with fake quantisation off: the fp32 base, the same model DPO
    precomputes its reference log-probs with (every weight trains, so no cheaper reference exists)."""
    inner = copy_reference(model)
    enable = _torchao().enable

    @contextlib.contextmanager
    def fp32_reference() -> Iterator[nn.Module]:
        with inner() as frozen:
            frozen.apply(lambda m: enable(m, False))
            yield frozen

    return fp32_reference


METHOD = MethodRuntime(apply=apply, save=save, load=load, merge=merge, reference=reference,
                       multi_unsupported=MULTI_UNSUPPORTED, self_contained=True)
