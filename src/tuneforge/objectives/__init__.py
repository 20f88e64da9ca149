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
from tuneforge.objectives.clm import ClmConfig
from tuneforge.objectives.mlm import MLMConfig
from tuneforge.objectives.sft import SftConfig
from tuneforge.objectives.span_corruption import SpanCorruptionConfig

register(ObjectiveSpec("classification", ClassificationConfig, "tuneforge.objectives.classification"))
register(ObjectiveSpec("clm", ClmConfig, "tuneforge.objectives.clm"))
register(ObjectiveSpec("sft", SftConfig, "tuneforge.objectives.sft"))
register(ObjectiveSpec("mlm", MLMConfig, "tuneforge.objectives.mlm"))
register(ObjectiveSpec("span_corruption", SpanCorruptionConfig, "tuneforge.objectives.span_corruption"))

__all__ = ["OBJECTIVES", "Built", "Objective", "ObjectiveSpec", "TaskData", "get_objective", "register"]
