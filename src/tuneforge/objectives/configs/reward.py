"""Config of the reward-model objective (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig

__all__ = ["RewardConfig"]


class RewardConfig(TaskConfig):
    """Options of reward-model training on preference pairs (Bradley-Terry loss)."""

    name: Literal["reward"] = "reward"
    margin_column: str | None = Field(
        None, description="numeric column: how much better chosen is; the loss is -logsigmoid(r_c - r_r - margin)")
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="add coef * mean((r_c + r_r)^2): keeps rewards centred on 0 (e.g. 0.01)")
    invalid: Literal["error", "skip"] = Field(
        "error", description="a malformed row (missing field, empty response): error naming file:line, or skip and count")
