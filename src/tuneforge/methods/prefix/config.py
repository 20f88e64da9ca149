"""Config of prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190): trained key/value vectors prepended at every attention layer; the model is frozen.

No torch import here: recipes validate without loading the runtime.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tuneforge.config.schema import MethodConfig

__all__ = ["PrefixConfig"]


class PrefixConfig(MethodConfig):
    """Prefix tuning: ``num_virtual_tokens`` trained key/value pairs per layer, the task head trains fully.

    ``projection`` turns on the paper's reparameterisation (prefixes are produced by a two-layer tanh MLP
    of width ``projection_hidden`` from a small embedding, which the paper found stabilises training); the
    saved adapter holds the projected prefixes. Works with encoder and decoder classifiers (BERT, RoBERTa,
    Llama, GPT-2); refused for T5 classification, where peft's prefix does not fit the encoder-decoder cache.

    Default learning rate 3e-2, the rate of the head (trained fully); the MLP and its embedding train at
    ``PROJECTION_LR_RATIO`` = 0.03 of it (3e-2 * 0.03 = 9e-4; see ``methods.prefix.apply``). Why, measured on
    MiniLM-L6 / SST-2: with one rate for both, no rate learned (dev accuracy = majority class at every rate
    from 1e-4 to 3e-2). On a fixed 32-row batch (40 AdamW steps, plain peft + plain torch loop, fp32; so peft
    alone fails the same way) the loss went 0.70 -> 0.40 at 1e-3 (the random head barely moves) and stalled
    at ~0.43 at 1e-2 / 3e-2, where Adam's per-weight steps, summed over the MLP's 512 hidden units, blew the
    prefixes up (std 0.3 -> 9 and 38); head at 3e-2 with the MLP at 1e-3 reached 0.005 (ptuning_v2: 0.001).
    `tuneforge train` (bf16 autocast, 1 epoch, batch 32) with 4,000 rows / 1,000 dev rows: 55.1% (majority)
    before, 82.0% now (ptuning_v2 at 3e-2: 79.2%); with 1,000 / 500 rows: 58.8% (majority) before, 76.8% now
    (ptuning_v2: 74.2%), and MLP ratio 0.1 or 0.01 at 3e-2 gave 58.8% / 62.6%.
    """

    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="prefix length (key/value pairs per layer)")
    projection: bool = Field(True, description="reparameterise prefixes through an MLP (Li & Liang 2021)")
    projection_hidden: int = Field(512, ge=1, description="hidden width of the reparameterisation MLP")
    default_lr: ClassVar[float] = 3e-2
    virtual_tokens: ClassVar[bool] = True
