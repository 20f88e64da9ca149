"""Loop shapes: the registry, what a loop is given (`LoopContext`) and what it must offer (`Loop`).

The supervised loop (`engine.loop.SupervisedLoop`) is the default; an objective names another in its
spec (``ObjectiveSpec(loop="...")``), e.g. PPO's rollout-then-update. A loop reuses the engine pieces
rather than re-implementing them: `build_optimizer`/`build_scheduler`, `Stepper` (backward, clipping,
non-finite policy, fp16 scaling), `EvalTracker` (evaluation, best checkpoint, early stopping),
`save_checkpoint`/`load_checkpoint` (exact resume) and the metrics logger; see `LoopBase`.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from tuneforge.config.schema import TrainConfig
from tuneforge.engine.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from tuneforge.engine.fast_attention import cpu_training_attention
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.engine.runtime import Runtime
from tuneforge.engine.stepping import Stepper
from tuneforge.engine.tracking import EvalTracker
from tuneforge.errors import ConfigError
from tuneforge.registry import LOOPS

__all__ = ["LOOPS", "FitResult", "Loop", "LoopBase", "LoopContext", "LoopSpec", "create_loop", "register", "steps_per_epoch"]


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_batches / grad_accum))


@dataclass
class FitResult:
    state: TrainerState
    best_checkpoint: Path | None
    last_eval: dict[str, Any]


@dataclass
class LoopContext:
    """Everything a loop needs. ``model`` is what gets checkpointed; ``module`` what runs forward (they
    differ only when a method trains a view of the model, e.g. the frozen method's head on features)."""

    model: nn.Module
    objective: Any
    train_data: Any
    cfg: TrainConfig
    groups: list[dict[str, Any]]
    run_dir: Path
    runtime: Runtime
    metric: str
    greater_is_better: bool
    module: nn.Module | None = None
    eval_data: Any = None
    logger: Any = None
    quiet: bool = False
    extensions: Sequence[Any] = field(default_factory=list)


class Loop(Protocol):
    """What the pipeline asks of a loop."""

    state: TrainerState
    total_steps: int
    steps_per_epoch: int
    logger: Any

    def resume(self) -> bool:
        """Load the latest checkpoint of the run if there is one; returns whether it did."""

    def fit(self) -> FitResult:
        """Train to the end (or early stop); the last checkpoint is written."""


def _row_gradient_refusal(ctx: LoopContext) -> str | None:
    """Why this loop cannot take row gradients of the word embedding (None when it can): they need one process,
    AdamW, no fp16 and the loop training the model itself."""
    if ctx.runtime.world_size > 1:
        return ("sparse row gradients are single-process only (DDP/FSDP/DeepSpeed reduce dense gradients); set it "
                "false under torchrun")
    if ctx.cfg.optimizer != "adamw":
        return f"needs train.optimizer=adamw (got {ctx.cfg.optimizer})"
    if ctx.module is not None and ctx.module is not ctx.model:
        return "this method trains a view of the model (cached features), not its embedding"
    if ctx.runtime.precision == "fp16":
        return "not with fp16 (the gradient scaler unscales dense gradients only); use bf16 or fp32"
    return None


def _check_sparse_embeddings(ctx: LoopContext) -> None:
    """``train.sparse_embeddings`` is refused, naming the key, where row gradients cannot be taken."""
    if why := _row_gradient_refusal(ctx):
        raise ConfigError(why, key="train.sparse_embeddings")


def _row_grads_apply(ctx: LoopContext) -> bool:
    """``train.embedding_row_grads`` (exact row gradients, `engine.sparse_rows`) applies here: on by default,
    so where it does not fit it is silently left off (the dense gradient is the same math). Measured on CPUs
    only, and without extensions or whole-model compile, which read or trace the embedding's gradient."""
    from tuneforge.engine.sparse_rows import row_grads_apply

    cfg = ctx.cfg
    return (cfg.embedding_row_grads and not cfg.sparse_embeddings and ctx.runtime.device.type == "cpu"
            and cfg.compile != "model" and not ctx.extensions and _row_gradient_refusal(ctx) is None
            and row_grads_apply(ctx.model))


class LoopBase:
    """The engine pieces wired once: optimizer, schedule, stepper, eval tracker, checkpoint/resume.

    A loop subclasses it, sets ``total_steps`` (and ``steps_per_epoch``) before calling ``super().__init__``
    and implements ``fit``; `checkpoint`, `resume`, `evaluate` and `compute_loss` are shared.
    """

    total_steps: int = 1
    steps_per_epoch: int = 1

    def __init__(self, ctx: LoopContext):
        self.ctx = ctx
        self.model, self.module = ctx.model, ctx.module if ctx.module is not None else ctx.model
        self.objective, self.cfg, self.runtime = ctx.objective, ctx.cfg, ctx.runtime
        self.train_data, self.eval_data, self.logger, self.quiet = ctx.train_data, ctx.eval_data, ctx.logger, ctx.quiet
        self.extensions = list(ctx.extensions)
        self.ckpt_root = ctx.run_dir / "checkpoints"
        self.row_grads = _row_grads_apply(ctx)
        if ctx.cfg.sparse_embeddings:
            _check_sparse_embeddings(ctx)
        if ctx.cfg.sparse_embeddings or self.row_grads:
            from tuneforge.engine.sparse_rows import enable_sparse_embedding

            enable_sparse_embedding(self.model)
        # CPU: cheaper dropout masks, in the dropout modules and (while a loss is computed) inside sdpa attention
        self.fast_attention = bool(ctx.cfg.fast_dropout and ctx.runtime.device.type == "cpu")
        self.by_document = bool(ctx.cfg.packed_attention and ctx.runtime.device.type == "cpu")
        if self.fast_attention:
            from tuneforge.engine.fast_dropout import use_fast_dropout

            use_fast_dropout(self.module)
        if ctx.cfg.compile != "off":  # after the module swaps above, so the compiled code sees them
            from tuneforge.engine.compile import apply_compile

            apply_compile(self.model, ctx.cfg.compile)
        self.optimizer = build_optimizer(ctx.groups, ctx.cfg, row_grads=self.row_grads)
        self.scheduler = build_scheduler(self.optimizer, ctx.cfg, self.total_steps)
        self.params = [p for g in ctx.groups for p in g["params"]]
        self.shards: Any = None  # what writes a partitioned optimizer state into each checkpoint (DeepSpeed)
        if ctx.runtime.distributed == "deepspeed":  # the engine owns backward, the update and the ZeRO state
            from tuneforge.engine.deepspeed_zero import DeepSpeedStepper

            self.stepper = self.shards = DeepSpeedStepper(self.module, self.optimizer, self.scheduler, ctx.cfg,
                                                          ctx.runtime, self.ckpt_root)
            self.module = self.stepper.engine
        else:
            self.stepper = Stepper(self.optimizer, self.scheduler, self.params, ctx.cfg, ctx.runtime, self.ckpt_root,
                                   sparse_grads=ctx.cfg.sparse_embeddings or self.row_grads)
        self.tracker = EvalTracker(ctx.objective, ctx.eval_data, ctx.cfg, ctx.runtime, ctx.metric,
                                   ctx.greater_is_better, ctx.quiet, self.extensions)
        self.state = TrainerState(total_steps=self.total_steps, precision=ctx.runtime.precision)

    # ------------------------------------------------------------------ shared pieces
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's loss on a device batch plus every extension's extra term."""
        return self._loss_and_outputs(batch)[0]

    def compute_loss_units(self, batch: dict[str, torch.Tensor], n_examples: int) -> tuple[torch.Tensor, int]:
        """`compute_loss` and the units its mean runs over: scored tokens when the outputs carry ``targets``
        (`TokenLogits`), else ``n_examples`` (what weights each rank's loss under DDP, `engine.distributed`)."""
        loss, outputs = self._loss_and_outputs(batch)
        targets = getattr(outputs, "targets", None)
        if isinstance(targets, torch.Tensor):  # -100: positions cross-entropy ignores
            return loss, int((targets != -100).sum())
        return loss, n_examples

    def _loss_and_outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        with cpu_training_attention(self.fast_attention, self.by_document):
            outputs = self.objective.forward(self.module, batch)
            loss = self.objective.loss(outputs, batch)
            for ext in self.extensions:
                term = ext.extra_loss(self.module, batch, outputs)
                if term is not None:
                    loss = loss + term
        return loss, outputs

    def evaluate(self, baseline: bool = False) -> bool:
        return self.tracker.evaluate(self.module, self.state, self.logger, baseline=baseline)

    @property
    def last_eval(self) -> dict[str, Any]:
        return self.tracker.last

    def checkpoint(self) -> Path:
        """Write a checkpoint of the current state (with the stepper's and the extensions' state); rotate."""
        extra = {"stepper": self.stepper.state_dict(),
                 "extensions": {e.name: e.state_dict() for e in self.extensions}}
        path = save_checkpoint(self.ckpt_root, self.model, self.optimizer, self.scheduler, self.state,
                               runtime=self.runtime, extra=extra, shards=self.shards)
        if self.runtime.is_main:  # only rank 0 writes (save_checkpoint gathers the other ranks' RNG states)
            rotate_checkpoints(self.ckpt_root, self.cfg.save_total_limit, protect=self.state.best_step)
        self.runtime.barrier()
        return path

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            return False
        saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))["total_steps"]
        if saved != self.total_steps:  # checked before touching any state
            raise ConfigError(
                f"{ckpt} was written for {saved} total steps but this config gives {self.total_steps}; "
                "resume with the same train.* settings (epochs, max_steps, batch_size x processes, grad_accum) and data",
                key="train.max_steps",
            )
        self.state, extra = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.shards)
        self._keep_precision(ckpt)
        self.stepper.load_state_dict(extra.get("stepper", {}))
        states = extra.get("extensions", {})
        for ext in self.extensions:
            if ext.name in states:
                ext.load_state_dict(states[ext.name])
        return True

    def _keep_precision(self, ckpt: Path) -> None:
        """Resume in the precision the checkpoint was trained in. ``precision: auto`` resolves per machine (on a
        CPU it measures, `engine.runtime`), so a run resumed elsewhere could switch between bf16 and fp32 and
        stop being exact: under ``auto`` the checkpoint's bf16/fp32 is kept; an explicit setting wins, with a
        warning. bf16 on a CPU without bf16 instructions is emulated (correct, slow)."""
        saved, now = self.state.precision, self.runtime.precision
        if saved and saved != now:
            if self.cfg.precision == "auto" and {saved, now} <= {"bf16", "fp32"}:
                self.runtime.precision = saved
                msg = (f"resuming {ckpt.name} in {saved}, the precision it was trained in (train.precision=auto "
                       f"picks {now} on this machine; set train.precision={now} to switch, losing exact resume)")
            else:
                msg = (f"warning: {ckpt.name} was trained in {saved}; continuing in {now} as train.precision="
                       f"{self.cfg.precision} says: the resumed run will not match an uninterrupted one exactly")
            if self.runtime.is_main and (msg.startswith("warning") or not self.quiet):
                tqdm.write(msg)
        self.state.precision = self.runtime.precision

    def best_checkpoint(self) -> Path | None:
        if self.state.best_step is None:
            return None
        p = self.ckpt_root / f"step-{self.state.best_step:08d}"
        return p if p.is_dir() else None

    def fit(self) -> FitResult:
        raise NotImplementedError(f"{type(self).__name__} must implement fit(): LoopBase gives only the pieces")


@dataclass(frozen=True)
class LoopSpec:
    """A registered loop shape: its name and the class taking one `LoopContext` (or ``"module:Class"``,
    imported when a run uses it)."""

    name: str
    target: str | type

    def cls(self) -> type:
        if isinstance(self.target, type):
            return self.target
        module, _, name = self.target.partition(":")
        return vars(importlib.import_module(module))[name]


def register(name: str, target: str | type) -> None:
    """Register a loop (``"package.module:Class"`` or the class itself); a second registration raises."""
    LOOPS.register(name, LoopSpec(name, target))


def create_loop(name: str, ctx: LoopContext) -> Loop:
    """The loop ``name`` built over ``ctx``."""
    return LOOPS.get(name).cls()(ctx)


register("supervised", "tuneforge.engine.loop:SupervisedLoop")
register("rollout", "tuneforge.engine.rollout:RolloutLoop")
