"""Config of T5 span corruption (torch-free)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig
from tuneforge.objectives.configs.checks import refuse_head_only

__all__ = ["SpanCorruptionConfig"]


class SpanCorruptionConfig(TaskConfig):
    """Options of T5 span corruption."""

    name: Literal["span_corruption"] = "span_corruption"
    noise_density: float = Field(0.15, gt=0, lt=1, description="share of tokens dropped from the input")
    mean_noise_span_length: float = Field(3.0, ge=1, description="mean length of a dropped span")
    eval_seed: int = Field(0, description="noise seed for evaluation (same spans every evaluation)")

    def check_run(self, run: Any) -> None:
        refuse_head_only(run, "predicts tokens through the whole model")
