"""One optimizer step, as any loop takes it: backward (scaled under fp16), clipping, the non-finite policy.

Non-finite policy (``train.nonfinite``): ``skip`` drops that step's update (the schedule and data still
advance) and stops with `TrainingError` after ``max_nonfinite`` such steps in a row; ``stop`` raises at
once. Either way the last written checkpoint is intact and ``--resume`` continues from it. Under fp16 the
gradient scaler owns overflowing gradients behind a finite loss (it skips the update and lowers the scale,
as it is meant to); those steps are not counted against the policy.

Under DDP every rank takes the same decision: the loop agrees on a non-finite loss across ranks before any
backward (`engine.loop`), and gradients are averaged before the norm is taken here, so the norm, and with
it the skip or the stop, is the same number on every rank. Only rank 0 prints the warning.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.config.schema import TrainConfig
from tuneforge.engine.checkpoint import TrainerState, latest_checkpoint
from tuneforge.engine.runtime import Runtime
from tuneforge.engine.sparse_rows import clip_grad_norm
from tuneforge.errors import TrainingError

__all__ = ["NonFinitePolicy", "Stepper"]


class NonFinitePolicy:
    """Counts skipped steps and raises `TrainingError` as ``train.nonfinite`` says."""

    def __init__(self, cfg: TrainConfig, ckpt_root: Path, *, say: bool = True):
        self.cfg, self.ckpt_root, self.say = cfg, ckpt_root, say

    def ok(self, state: TrainerState) -> None:
        state.nonfinite_in_a_row = 0

    def record(self, state: TrainerState) -> None:
        state.nonfinite_in_a_row += 1
        state.nonfinite_total += 1
        msg = f"non-finite loss or gradient at step {state.step + 1}"
        if self.cfg.nonfinite == "stop" or state.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            last = latest_checkpoint(self.ckpt_root)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"{msg} ({state.nonfinite_in_a_row} in a row, policy '{self.cfg.nonfinite}'); {where}. "
                "Lower train.lr or check the data; resume with --resume."
            )
        if self.say:
            tqdm.write(f"warning: {msg}; update skipped (policy 'skip')")


class Stepper:
    """Backward passes of micro-batches, then one guarded optimizer + scheduler step."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, params: list[torch.Tensor],
                 cfg: TrainConfig, runtime: Runtime, ckpt_root: Path, *, sparse_grads: bool = False):
        self.optimizer, self.scheduler, self.params, self.cfg = optimizer, scheduler, params, cfg
        self.sparse_grads = sparse_grads  # a row-sparse embedding gradient among params (`engine.sparse_rows`)
        self.scaler = runtime.grad_scaler()
        self.policy = NonFinitePolicy(cfg, ckpt_root, say=runtime.is_main)
        self.last_grad_norm: float | None = None

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        """Accumulate the gradient of ``loss / n_micro`` (scaled under fp16)."""
        scaled = loss / n_micro
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def discard(self, loss: torch.Tensor, n_micro: int) -> None:
        """A micro-batch whose loss is non-finite (on any rank): nothing to do here, `step` drops the
        accumulated gradients (a DeepSpeed engine needs to be told, `engine.deepspeed_zero`)."""

    def step(self, state: TrainerState, loss_finite: bool) -> bool:
        """Clip and update (or skip, see module docstring), advance the schedule, clear gradients; returns
        whether the update was applied."""
        grad_norm = None
        applied = False
        if loss_finite:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            # The norm is needed anyway to catch NaN/inf gradients behind a finite loss.
            if self.sparse_grads:
                grad_norm = float(clip_grad_norm(self.params, self.cfg.max_grad_norm))
            elif self.cfg.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
            else:
                grads = [p.grad for p in self.params if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
                self.scaler.update()
                applied = math.isfinite(grad_norm)
                self.policy.ok(state)
            elif math.isfinite(grad_norm):
                self.optimizer.step()
                self.policy.ok(state)
                applied = True
            else:
                self.policy.record(state)
        else:
            self.policy.record(state)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_grad_norm = grad_norm
        return applied

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
