"""Config of quantization-aware training (QAT): Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR (https://arxiv.org/abs/1712.05877).

Every weight trains (as full fine-tuning) while each linear layer of the backbone computes with
fake-quantised inputs and weights: int8 dynamic per-token activations and int4 or int8 symmetric weights,
per group of ``group_size`` input columns or per output channel. The forward pass therefore sees exactly the
rounding of the deployed integer model, and training learns weights that survive it (gradients pass the
rounding straight through). torchao does the work (see ``apply.py``).

Needs the optional ``torchao`` package (``pip install 'tuneforge[qat]'``); asking for the method without it
fails at config validation. No torch import here: recipes validate without the runtime, and a group size that
does not divide a layer's input width is refused here too, from the architecture built on PyTorch's ``meta``
device (no weights load).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from tuneforge.config.schema import ExtensionConfig, MethodConfig, StrictModel
from tuneforge.errors import ConfigError

__all__ = ["TORCHAO_INSTALL", "QatConfig", "QatOptions", "QatReportConfig", "check_qat_run", "group_size_problem",
           "linear_widths", "no_linear_message", "qat_options"]

TORCHAO_INSTALL = "pip install 'tuneforge[qat]' (or: pip install --no-deps torchao==0.18.0)"


@lru_cache(maxsize=32)
def linear_widths(model_path: str) -> dict[str, int]:
    """``{module path: in_features}`` of every ``nn.Linear`` of the base model at ``model_path`` (built on meta)."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        base = AutoModel.from_config(config)
    return {name: m.in_features for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}


def no_linear_message(model: str) -> str:
    return (f"method 'qat' quantises nn.Linear layers, and {model} has none outside its head (GPT-2's Conv1D "
            "layers are not nn.Linear); choose another method (e.g. full, lora)")


def group_size_problem(widths: dict[str, int], group_size: int) -> str | None:
    """A message when ``group_size`` does not divide the input width of some layers, else None."""
    bad = {name: w for name, w in widths.items() if w % group_size}
    if not bad:
        return None
    name, width = next(iter(bad.items()))
    allowed = sorted({g for g in (8, 16, 32, 64, 128, 256) if all(w % g == 0 for w in widths.values())})
    return (f"method.group_size={group_size} does not divide the input width of {len(bad)} linear layer(s) "
            f"(e.g. {name}: {width}); choose one of {allowed or 'none'} or 'per_channel'")


class QatOptions(StrictModel):
    """The quantisation QAT simulates: ``weight_bits`` (4 or 8: the integer width of the weights; activations
    are always int8, dynamic per token) and ``group_size`` (input columns sharing one weight scale, default 32,
    or ``per_channel``: one scale per output row). ``method: qat`` and LoRA's ``method.qat`` block take them."""

    weight_bits: Literal[4, 8] = Field(8, description="integer width of the weights (activations: int8)")
    group_size: int | Literal["per_channel"] = Field(
        32, description="input columns per weight scale, or 'per_channel' (one scale per output row)")

    @field_validator("group_size")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("give a positive number of input columns per scale, or 'per_channel'")
        return v

    @model_validator(mode="after")
    def _needs_torchao(self) -> Any:
        if importlib.util.find_spec("torchao") is None:
            raise ValueError(f"quantization-aware training needs the torchao package, which is not installed: "
                             f"{TORCHAO_INSTALL}")
        return self


def check_qat_run(run: Any, opts: QatOptions, key: str) -> None:
    """The run's model has ``nn.Linear`` layers and ``opts.group_size`` divides their widths (``key``: where
    ``group_size`` was given), checked on the architecture built on ``meta`` before any weight loads."""
    from tuneforge.models.registry import resolve_model

    try:
        path = resolve_model(run.model.name)
    except ConfigError:
        return  # the model itself is reported where it is loaded
    try:
        widths = linear_widths(str(path))
    except Exception:  # an architecture transformers cannot build from its config: `apply` checks the real model
        return
    if not widths:
        raise ConfigError(no_linear_message(str(run.model.name)), key="method")
    problem = None if opts.group_size == "per_channel" else group_size_problem(widths, opts.group_size)
    if problem:
        raise ConfigError(problem.replace("method.group_size", key), key=key)


class QatConfig(QatOptions, MethodConfig):
    """QAT: every parameter trains through fake-quantised linear layers; the run saves the converted model.

    Options (`QatOptions`): ``weight_bits`` (4 or 8; activations are always int8, dynamic per token),
    ``group_size`` (default 32, or ``per_channel``). The task head (and an output embedding, e.g. a causal
    LM's tied ``lm_head``) stays in fp32: it is small, freshly initialised for classification, and produces
    the logits directly. ``method: lora`` with a ``qat`` block is QAT of a frozen base under LoRA instead.

    Default learning rate 5e-5, as full fine-tuning (QAT fine-tunes every weight).
    """

    name: Literal["qat"] = "qat"
    default_lr: ClassVar[float] = 5e-5
    from_scratch: ClassVar[bool] = True

    def check_run(self, run: Any) -> None:
        check_qat_run(run, self, "method.group_size")

    def quantization_aware(self) -> QatOptions:
        return self


def qat_options(method: Any) -> QatOptions | None:
    """The QAT options of a run's method: ``method: qat`` itself, LoRA's ``method.qat`` block, else None
    (declared by each method config: `MethodConfig.quantization_aware`)."""
    return method.quantization_aware()


class QatReportConfig(ExtensionConfig):
    """The ``qat`` block of a QAT run's metrics (fp32 vs fake-quant vs converted); no options."""

    name: Literal["qat"] = "qat"
