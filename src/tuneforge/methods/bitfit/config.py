"""Config of BitFit (no options beyond the shared ones); refuses models without bias terms up front.

BitFit trains the bias terms of the backbone plus the task head (Ben Zaken, Ravfogel & Goldberg 2022,
"BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", ACL;
https://arxiv.org/abs/2106.10199). Architectures whose linear layers and norms have no bias (Llama,
Mistral, T5...) leave nothing to train but the head, so they are refused at config validation, before any
weights load: the check instantiates the architecture on PyTorch's ``meta`` device (no memory, no weights)
and counts its bias parameters.

Default learning rate 3e-3. The paper searched {1e-4, 4e-4, 7e-4, 1e-3} over long schedules; with ~125 steps
that is too small. Measured on MiniLM-L6 / SST-2, seed 42, bf16, batch 32, linear schedule with 6% warmup,
1,000-row dev sample (majority 0.551), budgets A = 1,000 rows x 4 epochs and B = 4,000 rows x 1 epoch
(full fine-tuning at 5e-5: A 0.844, B 0.849):

======  =====  =====
lr      A      B
======  =====  =====
1e-3    0.742
3e-3    0.809  0.808
5e-3           0.807
1e-2    0.822  0.551 (stuck at chance from the first steps)
======  =====  =====

3e-3 is the largest rate that trained in every run. BitFit stays ~4 points under full fine-tuning on this
small model and budget.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar, Literal

from tuneforge.config.schema import MethodConfig
from tuneforge.errors import ConfigError

__all__ = ["BitFitConfig", "backbone_bias_count", "no_bias_message"]


def no_bias_message(model: str, architecture: str) -> str:
    return (f"method 'bitfit' trains bias terms, but {model} ({architecture}) has none in its backbone "
            "(bias-free linear layers and norms); choose another method (e.g. adapter, lora, partial)")


@lru_cache(maxsize=32)
def backbone_bias_count(model_path: str) -> tuple[int, str]:
    """(number of bias parameters of the base model at ``model_path``, its class name), built on ``meta``."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        base = AutoModel.from_config(config)
    n = sum(p.numel() for name, p in base.named_parameters() if name.rsplit(".", 1)[-1] == "bias")
    return n, type(base).__name__


class BitFitConfig(MethodConfig):
    """Only bias terms and the task head train."""

    name: Literal["bitfit"] = "bitfit"
    default_lr: ClassVar[float] = 3e-3

    def check_run(self, run: Any) -> None:
        from tuneforge.models.registry import resolve_model

        try:
            path = resolve_model(run.model.name)
        except ConfigError:
            return  # the model itself is reported where it is loaded
        try:
            n, arch = backbone_bias_count(str(path))
        except Exception:  # an architecture transformers cannot build from its config: `apply` checks the real model
            return
        if n == 0:
            raise ConfigError(no_bias_message(str(run.model.name), arch), key="method")
