"""Multi-task training: several tasks, each with its own data and head, over one shared backbone.

Every task is a registered objective with a task head (``ObjectiveSpec.task_head``: classification, token
classification, extractive QA) run as the single-task run it would be (`configs.multitask.sub_run`): it reads
and checks its own data, builds its own transformers task model and tokenizer, tokenizes, computes its own
loss and metrics. This objective only combines them:

* the model is a `MultiTaskModel`: the task models with their base models replaced by one shared backbone,
  so any method that changes the backbone's weights or layers applies to all tasks at once;
* training batches come from `MultiTaskBatches` (one task per batch; ``proportional``, ``temperature`` or
  ``round_robin`` sampling as a pure function of seed and epoch, so resume is exact); the batch's ``task``
  index routes it to its task's forward and loss;
* evaluation runs each task's own ``evaluate`` on its validation data: ``<task>/<metric>`` for every metric,
  ``per_task`` (the report's table) and the headline ``score``, the mean of the tasks' headline metrics (each
  as a fraction: SQuAD's percent F1 counts as F1 / 100), which picks the best checkpoint;
* the saved folder reloads every head (`MultiTaskModel` layout in ``config.json``; each task's label set and
  tokenizer under ``tasks/<name>/``); ``eval``/``predict`` use one task (``task.select``, the ``--task``
  option), and ``tuneforge merge RUN OUT --task NAME`` writes that task as a plain transformers folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.multitask import MultiTaskBatches
from tuneforge.errors import ConfigError
from tuneforge.models.multitask import MultiTaskModel
from tuneforge.objectives.base import Built, TaskData, get_spec
from tuneforge.objectives.configs.multitask import MultiTaskConfig, sub_run

if TYPE_CHECKING:
    import torch

    from tuneforge.engine.runtime import Runtime

__all__ = ["MultiTaskConfig", "MultiTaskObjective", "TaskView"]

TASKS_DIR = "tasks"


class TaskView:
    """``model`` seen as task ``task``'s model: calls pass ``task=``, everything else is the model's (``eval()``,
    ``train()``, ``training``...), so a task's objective runs on a multi-task model unchanged."""

    def __init__(self, model: nn.Module, task: str):
        self.model, self.task = model, task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, task=self.task, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MultiTaskObjective:
    """Implements the `Objective` and `PredictiveObjective` protocols over several task objectives."""

    name = "multitask"
    default_metric = "score"
    greater_is_better = True

    def __init__(self, run: RunConfig):
        self.run = run
        cfg: MultiTaskConfig = run.task
        self.runs = {name: sub_run(run, name) for name in cfg.tasks}
        self.tasks = {name: get_spec(r.task.name).create(r) for name, r in self.runs.items()}
        self.names = list(self.tasks)
        self.tokenizers: dict[str, Any] = {}
        self.notes: list[str] = []
        for name, objective in self.tasks.items():
            if not objective.greater_is_better:
                raise ConfigError(f"task '{name}' ranks by a lower-is-better metric; the multi-task score averages "
                                  "higher-is-better headline metrics", key=f"task.tasks.{name}")

    # ----------------------------------------------------------------- data and model
    def load_data(self, run: RunConfig) -> TaskData:
        parts = {name: obj.load_data(self.runs[name]) for name, obj in self.tasks.items()}
        splits: dict[str, dict[str, Any]] = {}
        for name, part in parts.items():
            for split, records in part.splits.items():
                splits.setdefault(split, {})[name] = records
        notes = [f"{name}: {n}" for name, part in parts.items() for n in part.notes]
        sizes = ", ".join(f"{name} {len(part.splits['train']):,}" for name, part in parts.items())
        notes.append(f"tasks (training examples): {sizes}; sampling {run.task.sampling}"
                     + (f" (T={run.task.temperature:g})" if run.task.sampling == "temperature" else ""))
        return TaskData(splits=splits, info={name: part.info for name, part in parts.items()}, notes=notes)

    def _part(self, data: TaskData, name: str) -> TaskData:
        return TaskData({s: recs[name] for s, recs in data.splits.items() if name in recs}, data.info[name])

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        models, missing = {}, {}
        for name, objective in self.tasks.items():
            built = objective.build(self.runs[name], model_path, self._part(data, name))
            models[name], missing[name], self.tokenizers[name] = built.model, built.newly_initialized, built.tokenizer
        model = MultiTaskModel(models)
        prefix = model.base_model_prefix + "."
        # the kept backbone's weights the checkpoint lacked (e.g. a pooler) train as part of the heads
        fresh = [k for k in missing[model.backbone_task] if k.startswith(prefix)]
        fresh += [f"heads.{n}.{k}" for n, keys in missing.items() for k in keys if not k.startswith(prefix)]
        return Built(model, self.tokenizers[self.names[0]], sorted(fresh))

    def prepare(self, records: dict[str, Any], tokenizer: Any, run: RunConfig) -> MultiTaskBatches:
        """Each task's records tokenized by its own objective (and tokenizer) into one multi-task source."""
        parts = {name: self.tasks[name].prepare(records[name], self.tokenizers[name], self.runs[name])
                 for name in self.names if name in records}
        return MultiTaskBatches(parts, run.task.sampling, run.task.temperature)

    # ----------------------------------------------------------------- training
    def _route(self, batch: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
        return self.names[int(batch["task"])], {k: v for k, v in batch.items() if k != "task"}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        name, sub = self._route(batch)
        return self.tasks[name].forward(TaskView(model, name), sub)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        name, sub = self._route(batch)
        return self.tasks[name].loss(outputs, sub)

    def evaluate(self, model: nn.Module, data: MultiTaskBatches, *, batch_size: int, runtime: Runtime
                 ) -> dict[str, Any]:
        """Each task's metrics (``<task>/<metric>``, ``per_task``), their headline mean ``score`` and mean
        ``loss``; with ``task.select`` only that task's own metrics."""
        select = self.run.task.select
        if select is not None:
            return self.tasks[select].evaluate(TaskView(model, select), data.parts[select], batch_size=batch_size,
                                               runtime=runtime)
        per_task: dict[str, dict[str, Any]] = {}
        out: dict[str, Any] = {}
        headline, losses = [], []
        for name, part in data.parts.items():
            objective = self.tasks[name]
            m = _scalars(objective.evaluate(TaskView(model, name), part, batch_size=batch_size, runtime=runtime))
            out.update({f"{name}/{k}": v for k, v in m.items()})
            headline.append(m[objective.default_metric] / objective.spec.metric_scale)
            per_task[name] = {"task": objective.name, "metric": objective.default_metric,
                              "value": m[objective.default_metric], "loss": m.get("loss"), "examples": len(part)}
            if "loss" in m:
                losses.append(m["loss"])
        out = {"score": sum(headline) / len(headline), **({"loss": sum(losses) / len(losses)} if losses else {}), **out}
        out["per_task"] = per_task
        return out

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Per task, under ``tasks/<name>/``: its own artifacts (label set) and its tokenizer."""
        for name, objective in self.tasks.items():
            folder = out_dir / TASKS_DIR / name
            folder.mkdir(parents=True, exist_ok=True)
            objective.save_artifacts(folder, self._part(data, name))
            self.tokenizers[name].save_pretrained(folder)

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        """The multi-task model with every head, each task's label set and tokenizer restored."""
        import torch
        from transformers import AutoTokenizer

        from tuneforge.methods.saved import load_trained

        for name, objective in self.tasks.items():
            folder = model_dir / TASKS_DIR / name
            if not folder.is_dir():
                raise ConfigError(f"{model_dir} has no {TASKS_DIR}/{name}: not a multi-task model folder of this run")
            objective.load_state(folder)
            self.tokenizers[name] = AutoTokenizer.from_pretrained(folder)
        model = load_trained(MultiTaskModel, model_dir, dtype=torch.float32).eval()
        return Built(model, self.tokenizers[self.names[0]])

    def _selected(self, what: str) -> str:
        select = self.run.task.select
        if select is None:
            raise ConfigError(f"{what} uses one task of a multi-task run: pass --task NAME (tasks: "
                              f"{', '.join(self.names)})", key="task.select")
        return select

    def read_split(self, path: Path) -> Any:
        return {(name := self._selected("eval")): self.tasks[name].read_split(path)}

    def read_inputs(self, path: Path) -> tuple[list[str], list[str] | None]:
        return self.tasks[self._selected("predict")].read_inputs(path)

    def predict(self, built: Built, texts: list[str], pairs: list[str] | None, *, batch_size: int,
                runtime: Runtime) -> list[dict[str, Any]]:
        name = self._selected("predict")
        objective = self.tasks[name]
        if not objective.spec.predicts:
            raise ConfigError(f"task '{name}' does not predict labels", key="task.select")
        view = Built(TaskView(built.model, name), self.tokenizers[name])
        return objective.predict(view, texts, pairs, batch_size=batch_size, runtime=runtime)

    def baseline_metrics(self, train: dict[str, Any], records: dict[str, Any]) -> dict[str, float]:
        """Each task's model-free reference numbers, as ``<task>/<name>``."""
        out: dict[str, float] = {}
        for name, recs in records.items():
            for k, v in self.tasks[name].baseline_metrics(train[name], recs).items():
                out[f"{name}/{k}"] = v
        return out


OBJECTIVE = MultiTaskObjective
