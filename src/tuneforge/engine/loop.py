"""The supervised training loop, the default loop shape (see `engine.loops`).

It reads top to bottom: plan the epoch's batches, run ``grad_accum`` micro-batches through the
objective's ``forward`` and ``loss`` (plus run extensions' terms) under the runtime's autocast, then one
guarded optimizer step (`engine.stepping`), log, evaluate, checkpoint. Objectives plug in through
``forward``/``loss``/``evaluate``; methods through the parameters they leave trainable; extensions
through their hooks.

Under several processes (`engine.distributed`) each micro-batch of the plan is a *global* batch of
``batch_size x world_size`` examples planned identically on every rank; a rank runs its share, its loss
weighted so that DDP's gradient average is the global-batch mean, and the ranks agree on one number per
micro-batch (units, non-finite flag, loss, tokens) before any backward, so a NaN seen by one rank skips
the step on all of them instead of leaving the others waiting in DDP's all-reduce.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from tuneforge.data.batching import num_batches
from tuneforge.engine.distributed import loss_weight, no_sync, shard
from tuneforge.engine.loops import FitResult, LoopBase, LoopContext, steps_per_epoch
from tuneforge.engine.tracking import train_row

__all__ = ["SupervisedLoop", "Trainer"]


class SupervisedLoop(LoopBase):
    """Epochs over a fixed training set; the number of steps follows from its size (or ``train.max_steps``)."""

    def __init__(self, ctx: LoopContext):
        cfg = ctx.cfg
        self.global_micro_batch = cfg.batch_size * ctx.runtime.world_size  # one plan entry, over all ranks
        n_batches = num_batches(ctx.train_data, self.global_micro_batch)
        self.steps_per_epoch = steps_per_epoch(n_batches, cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        super().__init__(ctx)

    def fit(self) -> FitResult:
        cfg, st = self.cfg, self.state
        self.module.train()
        show = not self.quiet and self.runtime.is_main
        bar = tqdm(total=self.total_steps, initial=st.step, desc="train", unit="step", disable=not show,
                   dynamic_ncols=True)
        window_loss, window_n = 0.0, 0
        if cfg.eval_on_start and st.step == 0 and self.eval_data is not None:
            self.evaluate(baseline=True)
        try:
            while st.step < self.total_steps and not st.stopped_early:
                plan = self.train_data.plan(st.epoch, self.global_micro_batch, seed=cfg.seed, shuffle=True)
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
                        self._log(bar, window_loss, window_n)
                        window_loss, window_n = 0.0, 0
                    self._maybe_eval_and_save(epoch_end=epoch_end)
                    if st.stopped_early or epoch_end:
                        break
        finally:
            bar.close()
        st.finished = True
        return FitResult(st, self.best_checkpoint(), self.last_eval)

    def _step(self, micro: list[list[int]]) -> float | None:
        """One optimizer step over ``micro`` batches; returns the mean loss, or None if skipped."""
        if self.runtime.world_size > 1:
            return self._step_distributed(micro)
        st, total, finite = self.state, 0.0, True
        for indices in micro:
            batch = self.train_data.collate(indices)
            mask = batch.get("attention_mask")
            tokens = int(mask.sum()) if isinstance(mask, torch.Tensor) else None  # counted before the copy: no GPU sync
            batch = self.runtime.to_device(batch)
            with self.runtime.autocast():
                loss = self.compute_loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                finite = False
                break
            self.stepper.backward(loss, len(micro))
            total += value
            st.samples_seen += len(indices)
            if tokens is not None:
                st.tokens_seen += tokens
        applied = self.stepper.step(st, finite)
        return total / len(micro) if applied else None

    def _step_distributed(self, micro: list[list[int]]) -> float | None:
        """`_step` on this rank's share of each global micro-batch (see module docstring)."""
        st, rt, total, finite = self.state, self.runtime, 0.0, True
        for i, indices in enumerate(micro):
            mine = shard(indices, rt.rank, rt.world_size)
            # A rank whose share is empty (a last batch smaller than the world) still takes part in DDP's
            # all-reduce: it runs one example with weight 0.
            batch = rt.to_device(self.train_data.collate(mine or list(indices[:1])))
            with no_sync(self.module, skip_sync=i < len(micro) - 1):
                with rt.autocast():
                    loss, units = self.compute_loss_units(batch, len(mine))
                units = units if mine else 0
                value = float(loss.detach())
                ok = math.isfinite(value)
                tokens = int(batch["attention_mask"].sum()) if mine and "attention_mask" in batch else 0
                all_units, bad, weighted, all_tokens = rt.all_reduce_sum(
                    [units, 0.0 if ok else 1.0, value * units if ok else 0.0, tokens])
                if bad:
                    finite = False
                    self.stepper.discard(loss, len(micro))
                    break
                self.stepper.backward(loss * loss_weight(units, all_units, rt.world_size), len(micro))
            total += weighted / all_units if all_units else 0.0
            st.samples_seen += len(indices)
            st.tokens_seen += int(all_tokens)
        applied = self.stepper.step(st, finite)
        return total / len(micro) if applied else None

    def _log(self, bar: tqdm, window_loss: float, window_n: int) -> None:
        lr = self.scheduler.get_last_lr()[0]
        row = train_row(self.state, lr, self.steps_per_epoch, window_loss, window_n, self.stepper.last_grad_norm)
        self.logger.log(self.state.step, "train", row)
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", refresh=False)

    def _maybe_eval_and_save(self, epoch_end: bool) -> None:
        cfg, st = self.cfg, self.state
        last = st.step >= self.total_steps
        due_eval = self.tracker.due(st, last=last, epoch_end=epoch_end)
        is_best = self.evaluate() if due_eval else False
        if cfg.save_steps:
            due_save = st.step % cfg.save_steps == 0 or last
        else:
            due_save = due_eval or (self.eval_data is None and (epoch_end or last))
        if due_save or is_best:
            self.checkpoint()


#: the historical name of the supervised loop
Trainer = SupervisedLoop
