"""The rollout loop (``ObjectiveSpec(loop="rollout")``): PPO with a KL penalty, and GRPO, on the engine's pieces.

One step is one *iteration*, read top to bottom in `RolloutLoop._iteration`:

1. take the next batch of prompts of the seeded epoch plan (GRPO: each repeated ``task.group_size`` times);
2. sample completions (`objectives.rollouts.sample`), then score their tokens under the policy (log-probs,
   entropies, values of the value head) and under the reference (the method's reference context: adapters
   off, no second copy of the model), all without gradients;
3. rewards: the reward source's score of each completion (`tuneforge.rewards`);
   PPO: per-token reward = -beta * KL estimate, plus the score on the completion's last token (Ziegler et
   al. 2019); GAE advantages and returns on the value head's values; advantages whitened;
   GRPO: group-relative advantages; the KL goes into the loss instead;
4. ``task.ppo_epochs`` passes over the experience in shuffled mini-batches of ``task.mini_batch_size``
   completions, one guarded optimizer update each (`Stepper`: clipping, non-finite policy): clipped
   surrogate + ``vf_coef`` x clipped value loss (PPO) or the GRPO loss;
5. the KL controller adapts beta (adaptive: Ziegler et al.'s proportional rule); log one row: reward, KL,
   beta, entropy, clip fraction, policy and value losses, completion length; evaluate and checkpoint.

The model runs in eval mode throughout (no dropout): the probability ratio of the first update is exactly 1
and sampling, scoring and the updates see the same function. The value head (a linear map of the final
hidden state, zero-initialised; it shares the policy's backbone, as in Ziegler et al.) trains in its own
optimizer group. Checkpoints add the value head and the KL controller to what every loop saves (trainable
weights, optimizer, schedule, RNG, data position), at iteration boundaries: a resumed run samples the same
completions and ends with the same weights. The learning-rate schedule advances once per optimizer update:
``train.max_steps`` iterations x updates per iteration, warmup given in iterations.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tuneforge.engine.loops import FitResult, LoopBase, LoopContext
from tuneforge.engine.optim import build_scheduler
from tuneforge.errors import ConfigError
from tuneforge.objectives.rl_math import (
    gae,
    group_advantages,
    grpo_loss,
    kl_controller,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from tuneforge.objectives.rollouts import sample, score_tokens

__all__ = ["RolloutLoop", "write_rollout_plot"]


def write_rollout_plot(run_dir: Path) -> Path | None:
    """``plots/rollout.png``: mean reward and KL to the reference per iteration (train) and per evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tuneforge.track import read_metrics

    rows = read_metrics(run_dir)
    if not any(r.get("split") == "train" and "reward" in r for r in rows):
        return None
    fig = Figure(figsize=(9, 4), dpi=100)
    FigureCanvasAgg(fig)
    for k, key in enumerate(("reward", "kl")):
        ax = fig.add_subplot(1, 2, k + 1)
        for split, style in (("train", {"linewidth": 1.0}), ("eval", {"marker": "o"})):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=split, **style)
        ax.set_title("mean reward" if key == "reward" else "KL to the reference (nats per completion)")
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = run_dir / "plots" / "rollout.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _value_head(model: nn.Module) -> nn.Linear:
    """A zero-initialised linear map from the width the LM head reads to one value."""
    head = nn.Linear(model.get_output_embeddings().in_features, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class _RolloutState:
    """The loop's own state in a checkpoint (the value head, the KL controller), kept beside the run extensions'
    state so LoopBase's checkpoint and resume carry it."""

    name = "rollout"

    def __init__(self, loop: RolloutLoop):
        self.loop = loop

    def extra_loss(self, *args: Any) -> None:
        return None

    def on_eval(self, *args: Any) -> None:
        """Nothing to do."""

    def state_dict(self) -> dict[str, Any]:
        head = self.loop.value_head
        return {"value_head": head.state_dict() if head is not None else None,
                "kl_controller": self.loop.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.loop.value_head is not None:
            self.loop.value_head.load_state_dict(state["value_head"])
        self.loop.kl_ctl.load_state_dict(state["kl_controller"])


class RolloutLoop(LoopBase):
    """Iterations of sample -> score -> advantages -> clipped updates (see module docstring)."""

    def __init__(self, ctx: LoopContext):
        cfg, objective = ctx.cfg, ctx.objective
        self.task = task = objective.run.task
        self.grpo = not objective.value_head
        self.group = getattr(task, "group_size", 1)
        self.steps_per_epoch = max(1, math.ceil(len(ctx.train_data) / cfg.batch_size))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.mini = task.mini_batch_size or cfg.batch_size * self.group
        self.updates = task.ppo_epochs * math.ceil(cfg.batch_size * self.group / self.mini)
        groups = list(ctx.groups)
        self.value_head: nn.Linear | None = None
        if objective.value_head:
            self.value_head = ctx.runtime.move(_value_head(ctx.model))
            groups.append({"params": list(self.value_head.parameters()), "lr": max(g["lr"] for g in groups),
                           "weight_decay": 0.0, "names": ["value_head.weight", "value_head.bias"]})
        super().__init__(replace(ctx, groups=groups))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * self.total_steps)
        sched_cfg = cfg.model_copy(update={"warmup_steps": warmup * self.updates})
        self.scheduler = build_scheduler(self.optimizer, sched_cfg, self.total_steps * self.updates)
        self.stepper.scheduler = self.scheduler
        self.kl_ctl = kl_controller(task)
        # saved and restored with every checkpoint by LoopBase, as run extensions' state is
        self.extensions.append(_RolloutState(self))
        self._bind_reference()
        objective.bind_reward(self.runtime)

    def _bind_reference(self) -> None:
        """The method's reference context on the model as it is now (the base: no update and no resume yet)."""
        from tuneforge.methods import get_method

        run = self.objective.run
        method = get_method(run.method.name).runtime()
        if method.reference is None:
            raise ConfigError(f"method '{run.method.name}' has no reference context; task '{run.task.name}' needs "
                              "one for its KL to the reference", key="method")
        self.objective.use_reference(method.reference(self.model))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> FitResult:
        cfg, st = self.cfg, self.state
        show = not self.quiet and self.runtime.is_main
        bar = tqdm(total=self.total_steps, initial=st.step, desc=self.task.name, unit="it", disable=not show,
                   dynamic_ncols=True)
        if cfg.eval_on_start and st.step == 0 and self.eval_data is not None:
            self.evaluate(baseline=True)
        try:
            while st.step < self.total_steps and not st.stopped_early:
                plan = self.train_data.plan(st.epoch, cfg.batch_size, seed=cfg.seed, shuffle=True)
                while st.batch_in_epoch < len(plan) and st.step < self.total_steps:
                    t0 = time.perf_counter()
                    row = self._iteration(plan[st.batch_in_epoch])
                    st.train_seconds += time.perf_counter() - t0
                    st.batch_in_epoch += 1
                    st.step += 1
                    epoch_end = st.batch_in_epoch >= len(plan)
                    if epoch_end:
                        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                    bar.update(1)
                    self.logger.log(st.step, "train", row)
                    bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.2f}", refresh=False)
                    self._maybe_eval_and_save(epoch_end)
                    if st.stopped_early or epoch_end:
                        break
        finally:
            bar.close()
        st.finished = True
        if self.runtime.is_main:
            write_rollout_plot(self.ctx.run_dir)
        return FitResult(st, self.best_checkpoint(), self.last_eval)

    def _maybe_eval_and_save(self, epoch_end: bool) -> None:
        cfg, st = self.cfg, self.state
        last = st.step >= self.total_steps
        is_best = self.evaluate() if self.tracker.due(st, last=last, epoch_end=epoch_end) else False
        if cfg.save_steps:
            due_save = st.step % cfg.save_steps == 0 or last
        else:
            due_save = self.tracker.due(st, last=last, epoch_end=epoch_end) or (self.eval_data is None and (epoch_end or last))
        if due_save or is_best:
            self.checkpoint()

    def _experience(self, indices: list[int]) -> tuple[Any, dict[str, torch.Tensor], dict[str, float]]:
        """Sample and score one batch of prompts: the rollout, its per-token tensors and the logged numbers."""
        t, data, device = self.task, self.train_data, self.runtime.device
        batch = data.collate(indices)
        texts = [data.prompts.texts[i] for i in indices]
        if self.group > 1:
            batch = {k: v.repeat_interleave(self.group, 0) for k, v in batch.items()}
            texts = [x for x in texts for _ in range(self.group)]
        batch = self.runtime.to_device(batch)
        with torch.no_grad(), self.runtime.autocast():
            ro = sample(self.module, self.objective.tokenizer, batch, texts, max_new_tokens=t.max_new_tokens,
                        temperature=t.temperature)
            old = score_tokens(self.module, ro, t.temperature, self.value_head)
            with self.objective.reference_model(self.model) as ref_model:
                ref = score_tokens(ref_model, ro, t.temperature, entropy=False).logps
        scores = torch.tensor(self.objective.rewards(ro.prompts, ro.completions), dtype=torch.float32, device=device)
        mask = ro.response_mask.float()
        kl_seq = (kl_estimate(old.logps, ref, "k1") * mask).sum(1)
        beta = self.kl_ctl.value
        exp = {"mask": mask, "old_logps": old.logps, "ref_logps": ref}
        if self.grpo:
            exp["advantages"] = group_advantages(scores, self.group, t.scale_rewards)[:, None] * mask
        else:
            rewards = -beta * kl_estimate(old.logps, ref, t.kl_estimator) * mask
            last = mask.sum(1).long() - 1
            rewards[torch.arange(len(last), device=device), last] += scores
            adv, returns = gae(rewards, old.values, mask, t.gamma, t.lam)
            exp.update(advantages=masked_whiten(adv, mask) if t.whiten_advantages else adv, returns=returns,
                       old_values=old.values)
        logged = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                  "kl": float(kl_seq.mean()), "kl_coef": beta, "entropy": float(masked_mean(old.entropy, mask)),
                  "response_length": float(mask.sum(1).mean()), "eos_rate": float(ro.ended.float().mean())}
        return ro, exp, logged

    def _iteration(self, indices: list[int]) -> dict[str, float]:
        """One iteration (see module docstring); returns its log row."""
        t, st = self.task, self.state
        self.module.eval()  # no dropout anywhere in the loop (see module docstring)
        t0 = time.perf_counter()
        ro, exp, row = self._experience(indices)
        t1 = time.perf_counter()
        n = ro.input_ids.shape[0]
        stats: dict[str, list[float]] = defaultdict(list)
        for _ in range(t.ppo_epochs):
            perm = torch.randperm(n)  # the global RNG: checkpointed with the run, so a resume shuffles alike
            for start in range(0, n, self.mini):
                idx = perm[start : start + self.mini].to(ro.input_ids.device)
                loss, parts = self._minibatch_loss(ro.select(idx), {k: v[idx] for k, v in exp.items()})
                finite = bool(torch.isfinite(loss))
                if finite:
                    self.stepper.backward(loss, 1)
                applied = self.stepper.step(st, finite)
                if applied:
                    for k, v in parts.items():
                        stats[k].append(v)
                    stats["loss"].append(float(loss.detach()))
        st.samples_seen += n
        st.tokens_seen += int(exp["mask"].sum())
        self.kl_ctl.update(row["kl"], n)
        row.update({k: sum(v) / len(v) for k, v in stats.items()})
        row["completions"] = n
        row["rollout_seconds"], row["update_seconds"] = t1 - t0, time.perf_counter() - t1
        row["lr"] = self.scheduler.get_last_lr()[0]
        row["epoch"] = st.step / self.steps_per_epoch
        if self.stepper.last_grad_norm is not None:
            row["grad_norm"] = self.stepper.last_grad_norm
        return row

    def _minibatch_loss(self, ro: Any, exp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        t, mask = self.task, exp["mask"]
        with self.runtime.autocast():
            new = score_tokens(self.module, ro, t.temperature, self.value_head, entropy=False)
        approx_kl = float(masked_mean(0.5 * (new.logps - exp["old_logps"]) ** 2, mask).detach())
        if self.grpo:
            loss, clip_frac = grpo_loss(new.logps, exp["old_logps"], exp["ref_logps"], exp["advantages"], mask,
                                        t.clip_range, self.kl_ctl.value, t.kl_estimator)
            return loss, {"policy_loss": float(loss.detach()), "clip_frac": float(clip_frac), "approx_kl": approx_kl}
        pg, clip_frac = policy_loss(new.logps, exp["old_logps"], exp["advantages"], mask, t.clip_range)
        vl = value_loss(new.values, exp["old_values"], exp["returns"], mask, t.value_clip)
        return pg + t.vf_coef * vl, {"policy_loss": float(pg.detach()), "value_loss": float(vl.detach()),
                                     "clip_frac": float(clip_frac), "approx_kl": approx_kl}
