"""Wiring of one run: config -> data -> model -> method -> engine -> run directory.

Order matters for the "nothing is lost" rule: everything that can fail on user input (config, model name,
files, columns, labels, model/method compatibility) is checked before the run directory is created or any
weights are loaded; outputs are written atomically.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import RunConfig, to_yaml
from tuneforge.data.batching import Batches
from tuneforge.engine import Trainer, autocast_factory, param_groups, resolve_precision
from tuneforge.engine.checkpoint import latest_checkpoint, load_trainable
from tuneforge.errors import ConfigError
from tuneforge.eval import flatten_metrics
from tuneforge.eval.forgetting import Forgetting
from tuneforge.methods import MethodContext, get_method
from tuneforge.methods.saved import read_manifest, save_trained, weights_bytes
from tuneforge.models.anatomy import head_parameter_names, num_layers, trainable_summary
from tuneforge.models.scratch import describe, model_source
from tuneforge.objectives import get_objective
from tuneforge.track import (
    MetricsLogger,
    Stopwatch,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    cpu_info,
    peak_rss_mb,
    read_metrics,
    write_plots,
    write_report,
)

__all__ = ["RunResult", "default_output_dir", "train"]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def default_output_dir(run: RunConfig) -> Path:
    return Path("runs") / f"{run.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_run_dir(run: RunConfig, resume: bool, overwrite: bool) -> Path:
    """The run directory, after the checks that need no model (nothing is created or removed yet)."""
    run_dir = run.output_dir or default_output_dir(run)
    if resume:
        if latest_checkpoint(run_dir / "checkpoints") is None:
            raise ConfigError(f"nothing to resume: no checkpoint under {run_dir}/checkpoints", key="output_dir")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{run_dir} exists and is not empty; use --resume to continue it or --overwrite",
                          key="output_dir")
    return run_dir


def _make_run_dir(run_dir: Path, resume: bool) -> None:
    """Create (or, with --overwrite, empty) the run directory: done once the model and method are set up,
    so a refusal found while applying the method (e.g. an unknown LoRA target) leaves nothing behind."""
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def train(run: RunConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          command: str = "") -> RunResult:
    """Run one training job described by ``run``; returns the run directory and final metrics."""
    watch = Stopwatch()
    objective = get_objective(run)
    method = get_method(run.method.name).runtime()
    model_path, model_config = model_source(run)  # a model folder, or the tokenizer folder of a scratch model
    data = objective.load_data(run)  # every input check happens here, before the run dir exists
    forgetting = Forgetting.create(run, objective, data)  # task.general_eval, checked before the run dir too
    from transformers import set_seed

    n_layers = num_layers(model_config)
    run.method.check_model(n_layers)
    run_dir = _check_run_dir(run, resume, overwrite)
    for note in data.notes:
        _say(quiet, note)

    set_seed(run.train.seed)
    built = objective.build(run, model_path, data)
    model = built.model
    samples_hook = getattr(objective, "report_samples", None)  # LM objectives: generations before/after
    samples_before = samples_hook(model, built.tokenizer) if samples_hook else []
    # An LM head is pretrained, not a task head: methods treat only weights the checkpoint lacked as head.
    head = (set(built.newly_initialized) if getattr(objective, "pretrained_head", False)
            else head_parameter_names(model, built.newly_initialized))
    ctx = MethodContext(head, n_layers)
    if built.newly_initialized:
        _say(quiet, f"newly initialized (trained as part of the head): {', '.join(built.newly_initialized)}")
    model = method.apply(model, run, ctx)
    trainable, total = trainable_summary(model)
    _say(quiet, f"model {describe(run)}: {total:,} parameters, {trainable:,} trainable "
                f"({100 * trainable / total:.2f}%) with method '{run.method.name}'")

    splits: dict[str, Batches] = {
        name: objective.prepare(data.splits[name], built.tokenizer, run) for name in ("train", "validation")
    }
    precision = resolve_precision(run.train.precision)
    autocast = autocast_factory(precision)
    module = model
    view = getattr(method, "training_view", None)
    if view is not None:
        module, splits = view(model, run, objective, splits, autocast=autocast, quiet=quiet)

    groups = param_groups(model, run.train, run.lr, n_layers, ctx.head_names)
    metric = run.train.metric or objective.default_metric
    _make_run_dir(run_dir, resume)
    trainer = Trainer(
        model=model, module=module, objective=objective, train_data=splits["train"],
        eval_data=splits["validation"], cfg=run.train, groups=groups, run_dir=run_dir, autocast=autocast,
        logger=None, metric=metric, greater_is_better=objective.greater_is_better if metric == objective.default_metric
        else not metric.endswith("loss"), quiet=quiet,
    )
    resumed = trainer.resume() if resume else False
    atomic_write_text(run_dir / "config.yaml", to_yaml(run))  # after resume's checks: a refused resume keeps it
    if resumed:
        _say(quiet, f"resumed from step {trainer.state.step} of {trainer.total_steps}")
    _say(quiet, f"training: {len(splits['train']):,} examples, {trainer.total_steps} steps, precision {precision}, "
                f"lr {run.lr:g}")
    with MetricsLogger(run_dir, tensorboard=run.train.tensorboard,
                       resume_step=trainer.state.step if resumed else None) as logger:
        trainer.logger = logger
        if forgetting is not None:
            forgetting.fresh_parts = bool(built.newly_initialized)
            forgetting.before(run_dir, model, built.tokenizer, autocast)
        result = trainer.fit()

    if run.train.load_best_at_end and result.best_checkpoint is not None:
        load_trainable(model, result.best_checkpoint)
        _say(quiet, f"loaded best checkpoint (step {result.state.best_step}, {metric}={result.state.best_metric:.4f})")

    metrics = _final_metrics(run, objective, data, built, model, autocast, result, precision,
                             trainer.steps_per_epoch, run_dir)
    if forgetting is not None:
        metrics["forgetting"] = forgetting.after(run_dir, model, built.tokenizer, autocast)
    _save_model(run_dir / "model", model, built.tokenizer, objective, data, run, model_path)
    size = weights_bytes(run_dir / "model")
    what = "method weights and head only" if read_manifest(run_dir / "model") else "whole model"
    _say(quiet, f"saved {run_dir / 'model'}: {size / 2**20:,.2f} MiB of weights ({what})")
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_plots(run_dir)
    write_report(run_dir, {
        "title": f"tuneforge run: {run.task.name} / {run.method.name} / {describe(run)}",
        "command": command, "config": run.model_dump(mode="json"), "final_metrics": metrics["splits"],
        "throughput": metrics["train"], "peak_rss_mb": peak_rss_mb(), "wall_time_s": watch.elapsed,
        "trainable_params": trainable, "total_params": total, "hardware": cpu_info(), "notes": data.notes,
        "samples": _before_after(samples_before, samples_hook(model, built.tokenizer)) if samples_hook else None,
    })
    if forgetting is not None:
        forgetting.write_report_section(run_dir, metrics["forgetting"])
    return RunResult(run_dir, metrics)


def _before_after(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``report_samples`` output ({prompt, ..., generation}) side by side: before and after training."""
    return [{**{k: v for k, v in b.items() if k != "generation"}, "before": b["generation"], "after": a["generation"]}
            for b, a in zip(before, after, strict=False)]


def _final_metrics(run, objective, data, built, model, autocast, result, precision, steps_per_epoch,
                   run_dir) -> dict[str, Any]:
    st = result.state
    batch_size = run.train.eval_batch_size or 2 * run.train.batch_size
    losses = [r["loss"] for r in read_metrics(run_dir) if r.get("split") == "train" and r.get("loss") is not None]
    out: dict[str, Any] = {
        "train": {
            "steps": st.step, "epochs": round(st.step / steps_per_epoch, 4),
            "final_loss": losses[-1] if losses else None,
            "train_seconds": round(st.train_seconds, 3),
            "train_samples_per_s": st.samples_seen / st.train_seconds if st.train_seconds else None,
            "train_tokens_per_s": st.tokens_seen / st.train_seconds if st.train_seconds and st.tokens_seen else None,
            "precision": precision, "best_step": st.best_step, "best_metric": st.best_metric,
            "stopped_early": st.stopped_early, "nonfinite_steps": st.nonfinite_total,
        },
        "splits": {},
    }
    for split in ("validation", "test"):
        if split not in data.splits:
            continue
        batches = objective.prepare(data.splits[split], built.tokenizer, run)
        with torch.inference_mode():
            m = objective.evaluate(model, batches, batch_size=batch_size, autocast=autocast)
        baseline = getattr(objective, "majority_baseline", None)
        if baseline is not None:
            m["majority_accuracy"] = baseline(data.splits["train"], data.splits[split])
        out["splits"][split] = m
    out["eval"] = flatten_metrics(out["splits"].get("validation", {}))
    return out


def _save_model(out: Path, model, tokenizer, objective, data, run: RunConfig, model_path: Path) -> None:
    """The trained model as a Hugging Face folder (written atomically); see `methods.saved`."""
    with atomic_directory(out) as tmp:
        save_trained(model, tmp, run.method, model_path)
        tokenizer.save_pretrained(tmp)
        objective.save_artifacts(tmp, data)
