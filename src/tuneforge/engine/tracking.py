"""Evaluation bookkeeping any loop reuses: evaluate, log, best checkpoint and early stopping; the train log row.

Under several processes, rank 0 evaluates the unwrapped model on the whole validation split while the other
ranks wait, and its metrics are broadcast so every rank updates the same best-metric and early-stopping
state (the ranks must agree on when to save and stop); under FSDP every rank evaluates, since each forward
gathers the sharded weights from all of them. Evaluation is not sharded: metrics such as F1,
seqeval or SQuAD EM/F1 are not sums over examples, and the objectives compute them from the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tuneforge.config.schema import TrainConfig
from tuneforge.engine.checkpoint import TrainerState
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import TrainingError

__all__ = ["EvalTracker", "train_row"]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EvalTracker:
    """Runs ``objective.evaluate`` on the validation data and keeps best-metric / early-stopping state in the
    loop's `TrainerState` (so it is checkpointed with it)."""

    def __init__(self, objective: Any, eval_data: Any, cfg: TrainConfig, runtime: Runtime, metric: str,
                 greater_is_better: bool, quiet: bool, extensions: Sequence[Any] = ()):
        self.objective, self.eval_data, self.cfg, self.runtime = objective, eval_data, cfg, runtime
        self.metric, self.greater, self.quiet, self.extensions = metric, greater_is_better, quiet, extensions
        self.last: dict[str, Any] = {}

    def due(self, state: TrainerState, *, last: bool, epoch_end: bool) -> bool:
        """Whether an evaluation is due after this step (``train.eval_steps`` or each epoch, and at the end)."""
        if self.eval_data is None:
            return False
        return last or (state.step % self.cfg.eval_steps == 0 if self.cfg.eval_steps else epoch_end)

    def evaluate(self, module: Any, state: TrainerState, logger: Any, baseline: bool = False) -> bool:
        """Evaluate, log, update best/early-stopping state; returns whether this is the new best.

        ``baseline``: the untrained model (``train.eval_on_start``): logged and kept in the history as step 0,
        but not a candidate for the best checkpoint (there is none to load) nor counted for early stopping.
        """
        batch_size = self.cfg.eval_batch_size or 2 * self.cfg.batch_size
        inner = self.runtime.unwrap(module)  # a DDP wrapper's forward would be a collective
        metrics = None
        # FSDP: every rank's forward all-gathers the weights, so every rank evaluates (the same numbers)
        if self.runtime.is_main or self.runtime.distributed == "fsdp":
            metrics = self.objective.evaluate(inner, self.eval_data, batch_size=batch_size, runtime=self.runtime)
        metrics = self.runtime.broadcast(metrics)
        module.train()
        self.last = metrics
        scalars = _scalars(metrics)
        logger.log(state.step, "eval", scalars)
        state.eval_history.append({"step": state.step, **scalars})
        for ext in self.extensions:
            ext.on_eval(state.step, metrics)
        value = scalars.get(self.metric)
        if value is None:
            raise TrainingError(f"train.metric '{self.metric}' is not produced; available: {', '.join(scalars)}")
        shown = ", ".join(f"{k}={v:.4f}" for k, v in scalars.items() if "/" not in k)
        if baseline:
            self._say(f"eval before training: {shown}")
            return False
        better = state.best_metric is None or (value > state.best_metric if self.greater else value < state.best_metric)
        if better:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        else:
            state.evals_without_improvement += 1
            patience = self.cfg.early_stopping_patience
            if patience and state.evals_without_improvement >= patience:
                state.stopped_early = True
                if self.runtime.is_main:
                    tqdm.write(f"early stopping at step {state.step}: {self.metric} has not improved for {patience} "
                               "evaluations")
        self._say(f"eval @ step {state.step}: {shown}")
        return better

    def _say(self, msg: str) -> None:
        if not self.quiet and self.runtime.is_main:
            tqdm.write(msg)


def train_row(state: TrainerState, lr: float, steps_per_epoch: int, window_loss: float, window_n: int,
              grad_norm: float | None) -> dict[str, float]:
    """The ``train`` row logged every ``train.log_steps``: lr, epoch, mean loss of the window, grad norm, speed."""
    row: dict[str, float] = {"lr": lr, "epoch": state.step / steps_per_epoch}
    if window_n:
        row["loss"] = window_loss / window_n
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    if state.train_seconds > 0:
        row["samples_per_s"] = state.samples_seen / state.train_seconds
    return row
