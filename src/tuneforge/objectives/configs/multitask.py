"""Config of multi-task training (torch-free): several task blocks, each with its own data, one backbone.

    task:
      name: multitask
      sampling: temperature        # proportional | temperature | round_robin (see tuneforge.data.multitask)
      temperature: 2.0
      tasks:
        sst2:
          task: classification     # any objective whose spec has a task head (task_head=True)
          data: {train: ..., validation: ..., text_column: sentence}
        conll:
          task: {name: token_classification, scheme: iob1}
          data: {train: ..., validation: ...}

Overrides reach a task by its name: ``task.tasks.sst2.data.max_train_samples=500``. Each task is checked as
the single-task run it would be (same model, method and train block, its own task and data blocks), so its
errors are the ones a single-task run gives, prefixed with ``task.tasks.<name>``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from tuneforge.config.schema import DataConfig, RunConfig, StrictModel, TaskConfig, task_block

__all__ = ["MultiTaskConfig", "TaskEntry", "sub_run"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TaskEntry(StrictModel):
    """One task of a multi-task run: its objective options and its data."""

    task: SerializeAsAny[TaskConfig] = Field(description="the task's objective block, e.g. classification")
    data: DataConfig = Field(default_factory=DataConfig, description="the task's data block")

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v: Any) -> Any:
        return task_block(v)


class MultiTaskConfig(TaskConfig):
    """Options of multi-task training (see `tuneforge.objectives.multitask`)."""

    name: Literal["multitask"] = "multitask"
    own_data: ClassVar[bool] = True
    tasks: dict[str, TaskEntry] = Field(description="task name -> {task: ..., data: ...}; two or more")
    sampling: Literal["proportional", "temperature", "round_robin"] = Field(
        "proportional", description="which task each batch comes from: every batch once (proportional), drawn with "
        "p ~ n^(1/temperature) (temperature), or tasks in turn (round_robin)")
    temperature: float = Field(2.0, gt=0, description="temperature sampling: T (1 = proportional, large = uniform)")
    select: str | None = Field(None, description="eval/predict: the one task to use (the --task option)")

    @model_validator(mode="after")
    def _tasks(self) -> MultiTaskConfig:
        from tuneforge.objectives.base import get_spec

        if len(self.tasks) < 2:
            raise ValueError("task.tasks lists fewer than two tasks; a multi-task run lists two or more tasks")
        for name, entry in self.tasks.items():
            if not _NAME_RE.match(name):
                raise ValueError(f"task.tasks has '{name}', which is not a task name (letters, digits, _; not starting "
                                 "with a digit), so that overrides can reach it (task.tasks.NAME.data.train=...)")
            if not get_spec(entry.task.name).task_head:
                raise ValueError(f"task.tasks.{name}.task '{entry.task.name}' has no task head on a shared "
                                 "backbone; multi-task runs combine classification, token_classification and "
                                 "extractive_qa-like tasks")
        if self.select is not None and self.select not in self.tasks:
            raise ValueError(f"task.select '{self.select}' is not a task of this run; tasks: {', '.join(self.tasks)}")
        return self

    def check_run(self, run: Any) -> None:
        if run.method.virtual_tokens:
            raise ValueError(f"method.name '{run.method.name}' adds virtual tokens to one model's forward; a multi-task "
                             "run shares the backbone between several task models: use a method that changes the "
                             "backbone's weights or layers (full, frozen, lora, qlora, ia3, adapter, bitfit)")
        general = [k for k, v in (("task.general_eval", self.general_eval), *((f"retain.{n}", run.extension(n))
                                                                                  for n in ("ewc", "replay")))
                   if v is not None]
        forgetting = run.extension("forgetting")
        if forgetting is not None and forgetting.general_eval is not None:
            general.append("extensions.forgetting.general_eval")
        if general:
            raise ValueError(f"{general[0]} is not supported by multi-task runs yet: general data would need a task "
                             "to be read by; train the task alone for a forgetting report, EWC or replay")
        if run.data.train is not None or run.data.validation is not None:
            raise ValueError("data.train is not used by a multi-task run: each task reads its own data block "
                             "(task.tasks.NAME.data); leave the top-level data block empty")
        for name, entry in self.tasks.items():
            try:
                sub_run(run, name, entry)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"task.tasks.{name}{'.' + where if where else ''} {msg}") from None


def sub_run(run: Any, name: str, entry: TaskEntry | None = None) -> RunConfig:
    """Task ``name`` of multi-task ``run`` as the single-task run it would be (validated)."""
    entry = entry or run.task.tasks[name]
    return RunConfig(model=run.model, task=entry.task, method=run.method, data=entry.data, train=run.train,
                     output_dir=run.output_dir)
