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

    Default learning rate 1e-2 (see the measurement note in the method's README paragraph).
    """

    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="prefix length (key/value pairs per layer)")
    projection: bool = Field(True, description="reparameterise prefixes through an MLP (Li & Liang 2021)")
    projection_hidden: int = Field(512, ge=1, description="hidden width of the reparameterisation MLP")
    default_lr: ClassVar[float] = 1e-2
