"""The training loop shared by every objective.

It reads top to bottom: plan the epoch's batches, run ``grad_accum`` micro-batches through
``objective.loss`` under autocast, clip, step, log, evaluate, checkpoint. Objectives plug in through two
calls (``loss`` and ``evaluate``); methods through the parameters they leave trainable.

Non-finite loss policy (``train.nonfinite``): ``skip`` drops that step's update (the schedule and data
still advance) and stops with `TrainingError` after ``max_nonfinite`` such steps in a row; ``stop`` raises
at once. Either way the last written checkpoint is intact and ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tuneforge.config.schema import TrainConfig
from tuneforge.data.batching import Batches
from tuneforge.engine.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.errors import ConfigError, TrainingError

__all__ = ["FitResult", "Trainer", "steps_per_epoch"]


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_batches / grad_accum))


@dataclass
class FitResult:
    state: TrainerState
    best_checkpoint: Path | None
    last_eval: dict[str, Any]


class Trainer:
    """Runs one training job. ``model`` is what gets checkpointed; ``module`` what runs forward (they
    differ only when a method trains a view of the model, e.g. the frozen method's head on features)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        module: nn.Module,
        objective: Any,
        train_data: Batches,
        eval_data: Batches | None,
        cfg: TrainConfig,
        groups: list[dict[str, Any]],
        run_dir: Path,
        autocast: Callable[[], Any],
        logger: Any,
        metric: str,
        greater_is_better: bool,
        quiet: bool = False,
        on_eval: Callable[[int, dict[str, Any]], None] | None = None,
    ):
        self.model, self.module, self.objective = model, module, objective
        self.train_data, self.eval_data, self.cfg = train_data, eval_data, cfg
        self.run_dir, self.autocast, self.logger, self.quiet = run_dir, autocast, logger, quiet
        self.metric, self.greater = metric, greater_is_better
        self.on_eval = on_eval
        self.ckpt_root = run_dir / "checkpoints"
        n_batches = math.ceil(len(train_data) / cfg.batch_size)
        self.steps_per_epoch = steps_per_epoch(n_batches, cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(groups, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.params = [p for g in groups for p in g["params"]]
        self.state = TrainerState(total_steps=self.total_steps)
        self.last_eval: dict[str, Any] = {}
        self._last_grad_norm: float | None = None

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; returns whether it did."""
        ckpt = latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            return False
        saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))["total_steps"]
        if saved != self.total_steps:  # checked before touching any state
            raise ConfigError(
                f"{ckpt} was written for {saved} total steps but this config gives {self.total_steps}; "
                "resume with the same train.* settings (epochs, max_steps, batch_size, grad_accum) and data",
                key="train.max_steps",
            )
        self.state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        return True

    # ------------------------------------------------------------------ main loop
    def fit(self) -> FitResult:
        cfg, st = self.cfg, self.state
        self.module.train()
        bar = tqdm(total=self.total_steps, initial=st.step, desc="train", unit="step", disable=self.quiet,
                   dynamic_ncols=True)
        window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
        if cfg.eval_on_start and st.step == 0 and self.eval_data is not None:
            self.evaluate(baseline=True)
        try:
            while st.step < self.total_steps and not st.stopped_early:
                plan = self.train_data.plan(st.epoch, cfg.batch_size, seed=cfg.seed, shuffle=True)
                while st.batch_in_epoch < len(plan) and st.step < self.total_steps:
                    micro = plan[st.batch_in_epoch : st.batch_in_epoch + cfg.grad_accum]
                    t0 = time.perf_counter()
                    loss = self._step(micro)
                    st.train_seconds += time.perf_counter() - t0
                    st.batch_in_epoch += len(micro)
                    st.step += 1
                    epoch_end = st.batch_in_epoch >= len(plan)
                    if epoch_end:  # the next epoch gets its own plan (outer loop)
                        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                    if loss is not None:
                        window_loss, window_n = window_loss + loss, window_n + 1
                    bar.update(1)
                    if st.step % cfg.log_steps == 0 or st.step == self.total_steps:
                        window_loss, window_n, t_window = self._log(bar, window_loss, window_n, t_window)
                    self._maybe_eval_and_save(epoch_end=epoch_end)
                    if st.stopped_early or epoch_end:
                        break
        finally:
            bar.close()
        st.finished = True
        return FitResult(st, self._best_checkpoint(), self.last_eval)

    def _step(self, micro: list[list[int]]) -> float | None:
        """One optimizer step over ``micro`` batches; returns the mean loss, or None if skipped."""
        st, total = self.state, 0.0
        n_micro = len(micro)
        finite = True
        for indices in micro:
            batch = self.train_data.collate(indices)
            with self.autocast():
                loss = self.objective.loss(self.module, batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                finite = False
                break
            (loss / n_micro).backward()
            total += value
            st.samples_seen += len(indices)
            if "attention_mask" in batch:
                st.tokens_seen += int(batch["attention_mask"].sum())
        grad_norm = None
        if finite:
            # The norm is needed anyway to catch NaN/inf gradients behind a finite loss.
            if self.cfg.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
            else:
                grads = [p.grad for p in self.params if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            st.nonfinite_in_a_row = 0
        else:
            self._nonfinite()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._last_grad_norm = grad_norm
        return total / n_micro if finite else None

    def _nonfinite(self) -> None:
        st = self.state
        st.nonfinite_in_a_row += 1
        st.nonfinite_total += 1
        msg = f"non-finite loss or gradient at step {st.step + 1}"
        if self.cfg.nonfinite == "stop" or st.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            last = latest_checkpoint(self.ckpt_root)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"{msg} ({st.nonfinite_in_a_row} in a row, policy '{self.cfg.nonfinite}'); {where}. "
                "Lower train.lr or check the data; resume with --resume."
            )
        tqdm.write(f"warning: {msg}; update skipped (policy 'skip')")

    def _log(self, bar, window_loss: float, window_n: int, t_window: float) -> tuple[float, int, float]:
        st = self.state
        lr = self.scheduler.get_last_lr()[0]
        row: dict[str, float] = {"lr": lr, "epoch": st.step / self.steps_per_epoch}
        if window_n:
            row["loss"] = window_loss / window_n
        if self._last_grad_norm is not None:
            row["grad_norm"] = self._last_grad_norm
        if st.train_seconds > 0:
            row["samples_per_s"] = st.samples_seen / st.train_seconds
        self.logger.log(st.step, "train", row)
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", refresh=False)
        return 0.0, 0, time.perf_counter()

    # ------------------------------------------------------------------ eval / checkpoints
    def _maybe_eval_and_save(self, epoch_end: bool) -> None:
        cfg, st = self.cfg, self.state
        last = st.step >= self.total_steps
        due_eval = self.eval_data is not None and (
            last or (st.step % cfg.eval_steps == 0 if cfg.eval_steps else epoch_end)
        )
        is_best = False
        if due_eval:
            is_best = self.evaluate()
        if cfg.save_steps:
            due_save = st.step % cfg.save_steps == 0 or last
        else:
            due_save = due_eval or (self.eval_data is None and (epoch_end or last))
        if due_save or is_best:
            save_checkpoint(self.ckpt_root, self.model, self.optimizer, self.scheduler, st)
            rotate_checkpoints(self.ckpt_root, cfg.save_total_limit, protect=st.best_step)

    def evaluate(self, baseline: bool = False) -> bool:
        """Evaluate, log, update best/early-stopping state; returns whether this is the new best.

        ``baseline``: the untrained model (``train.eval_on_start``): logged and kept in the history as step 0,
        but not a candidate for the best checkpoint (there is none to load) nor counted for early stopping.
        """
        st = self.state
        batch_size = self.cfg.eval_batch_size or 2 * self.cfg.batch_size
        metrics = self.objective.evaluate(self.module, self.eval_data, batch_size=batch_size, autocast=self.autocast)
        self.module.train()
        self.last_eval = metrics
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.logger.log(st.step, "eval", scalars)
        st.eval_history.append({"step": st.step, **scalars})
        if self.on_eval:
            self.on_eval(st.step, metrics)
        value = scalars.get(self.metric)
        if value is None:
            raise TrainingError(f"train.metric '{self.metric}' is not produced; available: {', '.join(scalars)}")
        if baseline:
            if not self.quiet:
                tqdm.write("eval before training: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items() if "/" not in k))
            return False
        better = st.best_metric is None or (value > st.best_metric if self.greater else value < st.best_metric)
        if better:
            st.best_metric, st.best_step, st.evals_without_improvement = value, st.step, 0
        else:
            st.evals_without_improvement += 1
            patience = self.cfg.early_stopping_patience
            if patience and st.evals_without_improvement >= patience:
                st.stopped_early = True
                tqdm.write(f"early stopping at step {st.step}: {self.metric} has not improved for {patience} evaluations")
        if not self.quiet:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in scalars.items() if "/" not in k)
            tqdm.write(f"eval @ step {st.step}: {shown}")
        return better

    def _best_checkpoint(self) -> Path | None:
        if self.state.best_step is None:
            return None
        p = self.ckpt_root / f"step-{self.state.best_step:08d}"
        return p if p.is_dir() else None
