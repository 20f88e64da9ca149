"""Config of P-tuning v2 (Liu et al. 2022, "P-Tuning: Prompt Tuning Can Be Comparable to Fine-tuning Across
Scales and Tasks", ACL 2022, arXiv:2110.07602): deep prompts (trained key/value prefixes at every layer)
without reparameterisation, read out by a task head instead of a verbalizer.

No torch import here: recipes validate without loading the runtime.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tuneforge.config.schema import MethodConfig

__all__ = ["PtuningV2Config"]


class PtuningV2Config(MethodConfig):
    """P-tuning v2: ``num_virtual_tokens`` deep prompts per layer, trained directly, plus the task head.

    In peft terms this is prefix tuning with ``prefix_projection=False`` (the paper drops the MLP
    reparameterisation) on the model's own classification head; the paper uses prompt length 20 for simple
    classification tasks, our default. Same architecture support as ``prefix``.

    Default learning rate 3e-2, measured with `tuneforge train` (MiniLM-L6, 1,000 SST-2 training rows, 1 epoch at batch 16 (63 steps), 300 dev rows, majority 55.7%): dev accuracy 64.0% at 1e-2,
    79.3% at 3e-2, 55.7% (majority) at 1e-1.
    """

    name: Literal["ptuning_v2"] = "ptuning_v2"
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="prompt length per layer")
    default_lr: ClassVar[float] = 3e-2
    virtual_tokens: ClassVar[bool] = True
