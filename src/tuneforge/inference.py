"""After training: evaluate a run on a file, predict, and validate a recipe without training.

A run directory is self-describing: ``config.yaml`` (the resolved recipe) says which objective and data
layout it used, ``model/`` is a plain Hugging Face folder. Overrides given here (e.g. a different
``data.text_column`` for the evaluation file) apply on top of the saved recipe.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, load_config
from tuneforge.engine import Runtime
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import flatten_metrics
from tuneforge.objectives import get_objective
from tuneforge.objectives.base import final_evaluation
from tuneforge.track import atomic_write_text
from tuneforge.track.rundir import model_folder

__all__ = ["evaluate_file", "load_run", "predict_texts", "validate_run", "write_predictions"]


def load_run(run_dir: Path, overrides: list[str], task: str | None = None) -> RunConfig:
    """The saved config of ``run_dir`` with ``overrides`` applied; ``task`` picks one task of a multi-task
    run (its task config has a ``select`` field) and is refused for a single-task run."""
    cfg_file = run_dir / "config.yaml"
    if not (model_folder(run_dir) / "config.json").is_file() or not cfg_file.is_file():
        raise ConfigError(f"{run_dir} is not a finished tuneforge run (no config.yaml and model/)")
    run = load_config(cfg_file, overrides)
    if task is None:
        return run
    if "select" not in type(run.task).model_fields:
        raise ConfigError(f"--task picks one task of a multi-task run; {run_dir} is a single-task "
                          f"'{run.task.name}' run", key="task")
    return load_config(cfg_file, [*overrides, f"task.select={task}"])


def _runtime(run: RunConfig, run_dir: Path, model_dir: Path | None = None):
    """The objective, the saved model on the run's device choice (``train.device``, overridable), the
    runtime and the evaluation batch size."""
    runtime = Runtime.for_run(run.train)
    objective = get_objective(run)
    built = objective.from_saved(model_dir or model_folder(run_dir))
    built.model = runtime.move(built.model)
    batch_size = run.train.eval_batch_size or 2 * run.train.batch_size
    return objective, built, runtime, batch_size


def _base_model(target: Path, overrides: list[str]) -> tuple[RunConfig, Path]:
    """Config and folder to score a model that is not a run (``model=<target>`` plus the overrides).

    Only objectives that can score a pretrained model as it is (``spec.evaluates_base_models``: the causal
    LMs) accept one; for the others the target must be a run directory, and that error is raised.
    """
    from tuneforge.models.registry import resolve_model
    from tuneforge.objectives import get_spec

    run = load_config(None, [f"model={target}", *overrides])
    if not get_spec(run.task.name).evaluates_base_models:
        load_run(target, overrides)  # raises: not a finished run
    return run, resolve_model(run.model.name)


def evaluate_file(run_dir: Path, data: Path, overrides: list[str], task: str | None = None) -> dict[str, float]:
    """Flat metrics of the run's model on a labelled file (of task ``task`` of a multi-task run).

    ``run_dir`` may also be a registry model name or a HF folder for objectives that score a base model
    (``task=clm`` or ``task=sft`` among the overrides, e.g. perplexity of ``smollm2-135m`` on a text file).
    """
    if (run_dir / "config.yaml").is_file() or (run_dir / "model").is_dir():
        run = load_run(run_dir, overrides, task)
        objective, built, runtime, batch_size = _runtime(run, run_dir)
    else:
        run, folder = _base_model(run_dir, overrides)
        objective, built, runtime, batch_size = _runtime(run, folder, model_dir=folder)
    examples = objective.read_split(data)
    batches = objective.prepare(examples, built.tokenizer, run)
    return flatten_metrics(final_evaluation(objective, built.model, batches, batch_size=batch_size, runtime=runtime))


def predict_texts(run_dir: Path, texts: list[str], input_file: Path | None, overrides: list[str],
                  task: str | None = None) -> list[dict[str, Any]]:
    """Predictions for ``texts`` and/or the texts of ``input_file``, in order (by task ``task`` of a
    multi-task run)."""
    from tuneforge.objectives import get_spec

    run = load_run(run_dir, overrides, task)
    spec = get_spec(run.task.name)
    if not spec.predicts:
        instead = (f"use `tuneforge generate {run_dir} \"prompt\"`" if spec.generative
                   else f"use `tuneforge eval {run_dir} --data FILE` for its loss and metrics")
        raise ConfigError(f"predict labels texts; {run_dir} is a '{run.task.name}' run, which does not: {instead}",
                          key="task")
    objective, built, runtime, batch_size = _runtime(run, run_dir)
    pairs = None
    rows_text = list(texts)
    if input_file is not None:
        file_texts, pairs = objective.read_inputs(input_file)
        if rows_text and pairs is not None:
            raise ConfigError("give either texts on the command line or a sentence-pair --input file, not both")
        rows_text += file_texts
    for i, t in enumerate(rows_text):
        if not t.strip():
            raise DataError("empty text", input_file if input_file else "command line", i + 1)
    preds = objective.predict(built, rows_text, pairs, batch_size=batch_size, runtime=runtime)
    return [{"text": t, **p} for t, p in zip(rows_text, preds, strict=True)]


def write_predictions(rows: list[dict[str, Any]], output: Path) -> None:
    """Write predictions as JSONL (default) or CSV (by the ``.csv`` extension), atomically."""
    if output.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(output, buf.getvalue())
    else:
        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def validate_run(run: RunConfig) -> str:
    """Check config, model and data as `train` would, without loading weights; returns a summary."""
    from tuneforge.models.anatomy import num_layers
    from tuneforge.models.scratch import describe, model_source

    runtime = Runtime.for_run(run.train)
    objective = get_objective(run)
    _, model_config = model_source(run)  # a registry/local model, or a scratch model's config
    n_layers = num_layers(model_config)
    lines = [f"config ok: task={run.task.name} method={run.method.name} model={describe(run)} ({n_layers} layers) "
             f"on {runtime.describe()}"]
    run.method.check_model(n_layers)
    if run.data.train is not None or run.task.own_data:
        data = objective.load_data(run)
        sizes = ", ".join(f"{k}={_size(v)}" for k, v in data.splits.items())
        lines.append(f"data ok: {sizes}")
        from tuneforge.extensions import create_extensions

        active = [e.name for e in create_extensions(run, objective, data)]  # their input checks, as train runs them
        if active:
            lines.append(f"extensions: {', '.join(active)}")
        lines += [f"  {k}: {v}" for k, v in data.info.items()]
        lines += [f"  note: {n}" for n in data.notes]
    return "\n".join(lines)


def _size(records: Any) -> str:
    """Examples in a split; per task for a multi-task run's splits (a mapping task -> records)."""
    if isinstance(records, dict):
        return " + ".join(f"{len(v)} ({k})" for k, v in records.items())
    return str(len(records))
