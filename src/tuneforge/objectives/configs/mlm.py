"""Config of masked language modelling (torch-free)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig
from tuneforge.objectives.configs.checks import refuse_head_only, refuse_virtual_tokens

__all__ = ["MLMConfig"]


class MLMConfig(TaskConfig):
    """Options of masked language modelling."""

    name: Literal["mlm"] = "mlm"
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="share of tokens selected for prediction")
    mask_replace_prob: float = Field(0.8, ge=0, le=1, description="selected tokens replaced by the mask token")
    random_replace_prob: float = Field(0.1, ge=0, le=1, description="selected tokens replaced by a random token")
    whole_word_mask: bool = Field(False, description="select whole words rather than single tokens")
    eval_seed: int = Field(0, description="masking seed for evaluation (same masks every evaluation)")

    def check_run(self, run: Any) -> None:
        refuse_head_only(run, "predicts tokens through the whole model")
        # peft injects virtual tokens or past key/values only through its task-specific wrappers
        # (classification, QA, causal and seq2seq LM); it has none for masked LMs, so the method would fail
        # only after the weights load. The model of task 'mlm' is always a masked LM: refuse it now.
        refuse_virtual_tokens(run, "through a peft prompt-learning wrapper, and peft has none for masked language "
                                   "models (task 'mlm'); use full, partial or another PEFT method (lora, ia3, adapter, ...)")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError(f"task.random_replace_prob must be at most 1 - task.mask_replace_prob = "
                             f"{1 - self.mask_replace_prob:g} (got {self.random_replace_prob:g})")
