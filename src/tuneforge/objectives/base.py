"""The objective contract (a Protocol, not a base class) and the registry.

An objective owns everything task-specific: reading and validating its data (before any model loads),
building the model with the right head, tokenizing, the loss, evaluation metrics and prediction. The
engine only calls ``loss`` and ``evaluate``; the pipeline calls the rest in order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tuneforge.config.schema import RunConfig, TaskConfig, register_task_config
from tuneforge.data.batching import Batches
from tuneforge.errors import ConfigError

__all__ = ["OBJECTIVES", "Built", "Objective", "ObjectiveSpec", "TaskData", "get_objective", "register"]


@dataclass
class TaskData:
    """Validated, untokenized splits plus what the model needs to know (e.g. the label set).

    ``splits`` maps split name ("train", "validation", optionally "test") to objective-defined records.
    """

    splits: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Built:
    """A loaded model and tokenizer, and the checkpoint keys the model had to initialize fresh."""

    model: nn.Module
    tokenizer: Any
    newly_initialized: list[str] = field(default_factory=list)


class Objective(Protocol):
    name: str
    default_metric: str
    greater_is_better: bool

    def load_data(self, run: RunConfig) -> TaskData: ...

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built: ...

    def prepare(self, records: Any, tokenizer: Any, run: RunConfig) -> Batches: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(
        self, model: nn.Module, data: Batches, *, batch_size: int, autocast: Callable[[], Any]
    ) -> dict[str, Any]: ...

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None: ...


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: name, config class and the module whose ``OBJECTIVE`` class implements it."""

    name: str
    config: type[TaskConfig]
    module: str

    def create(self, run: RunConfig) -> Objective:
        """Instantiate the objective for one run (it may keep run state, e.g. class weights)."""
        return importlib.import_module(self.module).OBJECTIVE(run)


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> None:
    OBJECTIVES[spec.name] = spec
    register_task_config(spec.name, spec.config)


def get_objective(run: RunConfig) -> Objective:
    """The objective of ``run.task``, instantiated for that run."""
    name = run.task.name
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown task '{name}'; allowed: {', '.join(sorted(OBJECTIVES))}", key="task")
    return OBJECTIVES[name].create(run)
