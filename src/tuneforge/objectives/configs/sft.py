"""Config of supervised fine-tuning on instruction / chat data (torch-free)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig
from tuneforge.objectives.configs.clm import check_lm_method

__all__ = ["SftConfig"]


class SftConfig(TaskConfig):
    """Options of supervised fine-tuning on instruction / chat data."""

    name: Literal["sft"] = "sft"
    format: Literal["auto", "alpaca", "sharegpt", "openai"] = Field(
        "auto", description="row format; auto = from the first row's keys, per file")
    template: Literal["auto", "alpaca", "chatml", "plain"] = Field(
        "auto", description="chat template; auto = the tokenizer's own, else alpaca")
    system_prompt: str | None = Field(None, description="system message for conversations without one")
    train_on_prompt: bool = Field(False, description="also take the loss on system/user tokens and role headers")
    packing: Literal["none", "documents"] = Field(
        "none", description="documents: pack whole examples into rows of data.max_length, attention kept inside each")

    def check_run(self, run: Any) -> None:
        check_lm_method(run, self.packing == "documents", "none")
