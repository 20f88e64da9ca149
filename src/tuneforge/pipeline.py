"""Wiring of one run: config -> runtime -> data -> model -> method -> loop -> run directory.

Order matters for the "nothing is lost" rule: everything that can fail on user input (config, device,
model name, files, columns, labels, model/method compatibility, extensions' inputs) is checked before the
run directory is created or any weights are loaded; outputs are written atomically. The pipeline knows
no objective, method, extension or loop by name: it asks their registries and declared capabilities.

Under several processes (torchrun, accelerate; `engine.distributed`) every rank runs this function; only
rank 0 creates and writes the run directory (config, metrics, checkpoints, the final model, plots, the
report) while the others wait at barriers, and only rank 0 returns the final metrics.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, to_yaml
from tuneforge.engine import LoopContext, Runtime, create_loop, param_groups
from tuneforge.engine.checkpoint import latest_checkpoint, load_trainable
from tuneforge.errors import ConfigError
from tuneforge.extensions import Extension, RunContext, create_extensions
from tuneforge.methods.saved import read_manifest, weights_bytes
from tuneforge.models.anatomy import num_layers
from tuneforge.models.scratch import describe, model_source
from tuneforge.objectives import get_objective
from tuneforge.outputs import final_metrics, save_model
from tuneforge.track import (
    MetricsLogger,
    Stopwatch,
    atomic_write_json,
    atomic_write_text,
    cpu_info,
    peak_rss_mb,
    write_plots,
    write_report,
)
from tuneforge.track.trackers import Trackers
from tuneforge.wiring import wire

__all__ = ["RunResult", "default_output_dir", "train"]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def default_output_dir(run: RunConfig) -> Path:
    return Path("runs") / f"{run.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _name_patterns(names: list[str], most: int = 4) -> str:
    """Parameter names for a message: layer indices folded (``layer.*.``), then owning modules when still long."""
    import re

    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    if len(folded) > most:
        folded = list(dict.fromkeys(n.rsplit(".", 1)[0] + ".*" for n in folded))  # their modules
    shown = ", ".join(folded[:most]) + (f" (+{len(folded) - most} more)" if len(folded) > most else "")
    return f"{shown} ({len(names)} tensors)" if len(folded) < len(names) else shown


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


class _NoLogger:
    """The metrics logger of ranks other than 0: they write nothing."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _unsharded(model: Any, run: RunConfig, objective: Any, data: Any, model_path: Path, runtime: Runtime,
               n_layers: int) -> Any:
    """FSDP: every rank sends its shards to rank 0 (collective), which loads them into a fresh plain model built
    the same way (the sharded one cannot be saved as an HF folder); other ranks get None."""
    from tuneforge.engine.fsdp import full_state

    state = full_state(model)
    if not runtime.is_main:
        return None
    plain = wire(run, objective, data, model_path, runtime, n_layers).model
    plain.load_state_dict(state)
    return plain


def train(run: RunConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          command: str = "") -> RunResult:
    """Run one training job described by ``run``; returns the run directory and final metrics."""
    watch = Stopwatch()
    runtime = Runtime.for_run(run.train)  # a device that is not there is a config error, before anything
    objective = get_objective(run)
    model_path, model_config = model_source(run)  # a model folder, or the tokenizer folder of a scratch model
    data = objective.load_data(run)  # every input check happens here, before the run dir exists
    extensions = create_extensions(run, objective, data)  # their input checks too
    lossy = [e.name for e in extensions if type(e).extra_loss is not Extension.extra_loss]
    why_not = {"fsdp": "their anchors and teachers would see sharded weights", "deepspeed": "not tested there"}
    if lossy and runtime.distributed in why_not:
        raise ConfigError(f"extensions that add a loss term ({', '.join(lossy)}) are not supported with "
                          f"train.distributed={runtime.distributed} ({why_not[runtime.distributed]}); use ddp",
                          key="train.distributed")
    if runtime.distributed == "deepspeed":  # its config is checked here, before anything is built
        from tuneforge.engine.deepspeed_zero import ds_config

        ds_config(run.train, runtime.world_size)
        if objective.spec.loop != "supervised":
            raise ConfigError(f"task {run.task.name} trains with the '{objective.spec.loop}' loop, which "
                              "train.distributed=deepspeed does not drive; use ddp", key="train.distributed")
    n_layers = num_layers(model_config)
    run.method.check_model(n_layers)
    run_dir = _check_run_dir(run, resume, overwrite)
    trackers = Trackers.for_run(run, enabled=runtime.is_main)  # a tracker's missing extra fails here, before any weights
    ctx = RunContext(run, objective, data, runtime, quiet)
    for note in data.notes:
        ctx.say(note)

    def on_built(built: Any) -> None:
        ctx.built = built
        if built.newly_initialized:
            ctx.say(f"newly initialized (trained as part of the head): {_name_patterns(built.newly_initialized)}")
        for ext in extensions:
            ext.on_build(ctx)

    wired = wire(run, objective, data, model_path, runtime, n_layers, on_built=on_built)
    model = ctx.model = wired.model
    ctx.head_names = set(wired.ctx.head_names)
    ctx.say(f"model {describe(run)}: {wired.total:,} parameters, {wired.trainable:,} trainable "
            f"({100 * wired.trainable / wired.total:.2f}%) with method '{run.method.name}'")
    splits = {name: objective.prepare(data.splits[name], wired.built.tokenizer, run) for name in ("train", "validation")}
    module = model
    if wired.method.training_view is not None:
        module, splits = wired.method.training_view(model, run, objective, splits, runtime=runtime, quiet=quiet)
        ctx.training_view = module is not model
    if runtime.distributed in ("fsdp", "deepspeed") and module is not model:
        raise ConfigError(f"method '{run.method.name}' trains a view of the model (cached features), which "
                          f"train.distributed={runtime.distributed} does not wrap; use ddp", key="train.distributed")
    for ext in extensions:
        splits["train"] = ext.train_data(splits["train"], ctx)

    metric = run.train.metric or objective.default_metric
    greater = objective.greater_is_better if metric == objective.default_metric else not metric.endswith("loss")
    runtime.barrier()  # every rank has checked the run dir before rank 0 creates it
    if runtime.is_main:
        _make_run_dir(run_dir, resume)
    runtime.barrier()
    ctx.run_dir = run_dir
    loop = create_loop(objective.spec.loop, LoopContext(
        model=model, module=runtime.wrap(module), objective=objective, train_data=splits["train"],
        eval_data=splits["validation"], cfg=run.train, run_dir=run_dir, runtime=runtime, metric=metric,
        groups=param_groups(model, run.train, run.lr, n_layers, wired.ctx.head_names, wired.lr_scales),
        greater_is_better=greater, quiet=quiet, extensions=extensions))
    for ext in extensions:  # the starting weights, also on --resume (the checkpoint loads next)
        ext.on_train_start(ctx)
    resumed = loop.resume() if resume else False
    if runtime.is_main:  # after resume's checks: a refused resume keeps it
        atomic_write_text(run_dir / "config.yaml", to_yaml(run))
    if resumed:
        ctx.say(f"resumed from step {loop.state.step} of {loop.total_steps}")
    ctx.say(f"training: {len(splits['train']):,} examples, {loop.total_steps} steps on {runtime.describe()}, "
            f"lr {run.lr:g}")
    if runtime.world_size > 1:
        ctx.say(f"global batch: {run.train.batch_size} per rank x {runtime.world_size} ranks x "
                f"{run.train.grad_accum} accumulation = {run.train.batch_size * runtime.world_size * run.train.grad_accum}")
    resume_step = loop.state.step if resumed else None
    logs = (MetricsLogger(run_dir, resume_step=resume_step,
                          trackers=trackers.start(run_dir, resume_step))
            if runtime.is_main else _NoLogger())
    with logs as logger:
        loop.logger = logger
        result = loop.fit()
    if runtime.distributed == "fsdp":  # gather the shards; rank 0 goes on with a plain copy of the model
        model = ctx.model = _unsharded(model, run, objective, data, model_path, runtime, n_layers)
    if not runtime.is_main:  # rank 0 alone evaluates the final model and writes the outputs
        runtime.barrier()
        return RunResult(run_dir, {})

    if run.train.load_best_at_end and result.best_checkpoint is not None:
        load_trainable(model, result.best_checkpoint)
        ctx.say(f"loaded best checkpoint (step {result.state.best_step}, {metric}={result.state.best_metric:.4f})")

    tokenizer = wired.built.tokenizer
    metrics = final_metrics(run, objective, data, tokenizer, model, runtime, result, loop.steps_per_epoch, run_dir,
                            (wired.trainable, wired.total))
    blocks = {ext.name: ext.on_end(ctx) for ext in extensions}
    metrics.update({name: block for name, block in blocks.items() if block is not None})
    save_model(run_dir / "model", model, tokenizer, objective, data, run, model_path)
    size = weights_bytes(run_dir / "model")
    manifest = read_manifest(run_dir / "model")  # a self-contained method (qat) saves the whole model too
    what = "method weights and head only" if manifest and manifest["base_model"] != "." else "whole model"
    ctx.say(f"saved {run_dir / 'model'}: {size / 2**20:,.2f} MiB of weights ({what})")
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_plots(run_dir)
    sections = [s for ext in extensions if (s := ext.report_section(blocks[ext.name]))]
    write_report(run_dir, {
        "title": f"tuneforge run: {run.task.name} / {run.method.name} / {describe(run)}",
        "command": command, "config": run.model_dump(mode="json"), "final_metrics": metrics["splits"],
        "throughput": metrics["train"], "peak_rss_mb": peak_rss_mb(), "wall_time_s": watch.elapsed,
        "trainable_params": wired.trainable, "total_params": wired.total, "hardware": cpu_info(),
        "notes": data.notes, "sections": sections,
    })
    trackers.finish(run_dir)  # the report, plots and final metrics go to the trackers too
    runtime.barrier()
    return RunResult(run_dir, metrics)
