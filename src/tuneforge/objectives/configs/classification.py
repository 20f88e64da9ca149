"""Config of the classification objective (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig

__all__ = ["ClassificationConfig"]


class ClassificationConfig(TaskConfig):
    """Options of the classification objective."""

    name: Literal["classification"] = "classification"
    class_weights: Literal["balanced"] | list[float] | dict[str, float] | None = Field(
        None, description="weight the loss per class: 'balanced', a list in label order, or label -> weight"
    )
