"""Training objectives, one module each, registered by one line below (see `objectives.base`)."""

from __future__ import annotations

from tuneforge.objectives.base import (
    OBJECTIVES,
    Built,
    Objective,
    ObjectiveSpec,
    TaskData,
    get_objective,
    register,
)
from tuneforge.objectives.classification import ClassificationConfig

register(ObjectiveSpec("classification", ClassificationConfig, "tuneforge.objectives.classification"))

__all__ = ["OBJECTIVES", "Built", "Objective", "ObjectiveSpec", "TaskData", "get_objective", "register"]
