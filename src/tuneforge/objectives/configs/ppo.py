"""Configs of the rollout objectives on a causal LM: PPO with a KL penalty (RLHF) and GRPO (torch-free).

Both train the policy on its own samples (the ``rollout`` loop, `tuneforge.engine.rollout`): each step (an
*iteration*) samples completions of ``train.batch_size`` prompts, scores them with ``task.reward`` and makes
``task.ppo_epochs`` passes of clipped-surrogate updates over that experience, in mini-batches of
``task.mini_batch_size`` completions. ``train.max_steps`` / ``save_steps`` / ``eval_steps`` / ``log_steps``
count iterations; ``train.warmup_steps`` too (the schedule itself advances once per optimizer update).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig
from tuneforge.objectives.configs.checks import refuse_head_only

__all__ = ["GrpoConfig", "PpoConfig", "RolloutConfig"]


class RolloutConfig(TaskConfig):
    """What PPO and GRPO share: prompts, sampling, the reward and the clipped update."""

    reward: str = Field(
        ..., description="a reward-model run (task: reward), a classifier run (task: classification; reward = the "
        "probability of task.reward_label) or a Python function 'module:function' called as f(prompts, completions) "
        "-> one number per completion")
    reward_label: str | None = Field(None, description="classifier runs: the label whose probability is the reward")
    reward_text: Literal["full", "completion"] = Field(
        "full", description="what a classifier scores: the prompt followed by the completion, or the completion alone")
    chat: bool = Field(False, description="render prompts with the chat template (else raw text to continue)")
    prompt_words: int | None = Field(
        None, ge=1, description="keep only the first N words of each prompt (an opening to continue)")
    max_prompt_length: int = Field(64, ge=1, description="prompt tokens kept (cut from the left)")
    max_new_tokens: int = Field(32, ge=1, le=2048, description="tokens sampled per completion at most")
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature, applied alike when sampling and when scoring log-probs "
        "(no top-k / top-p: they would make the sampled and the scored distributions differ)")
    ppo_epochs: int = Field(4, ge=1, description="passes over each batch of experience")
    mini_batch_size: int | None = Field(
        None, ge=1, description="completions per optimizer update (default: all of an iteration's)")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="per-token KL to the reference (Schulman 2020): k1 log(pi/ref), k2 half its square, "
        "k3 ref/pi - 1 - log(ref/pi)")

    def check_run(self, run: Any) -> None:
        refuse_head_only(run, "has none (the LM head is the pretrained output layer)")
        if run.train.grad_accum != 1:
            raise ValueError("train.grad_accum does not apply to the rollout loop: set task.mini_batch_size "
                             "(completions per optimizer update)")
        if run.retain or any(getattr(e, "retain", False) for e in run.extensions):
            raise ValueError(f"task '{self.name}' trains on its own samples; the retain cures (L2-SP, EWC, "
                             "distillation, replay) are not wired into the rollout loop")
        if self.mini_batch_size is not None and self.mini_batch_size > self.rollouts(run):
            raise ValueError(f"task.mini_batch_size ({self.mini_batch_size}) exceeds the completions of one "
                             f"iteration ({self.rollouts(run)})")

    def rollouts(self, run: Any) -> int:
        """Completions sampled per iteration."""
        return run.train.batch_size


class PpoConfig(RolloutConfig):
    """PPO with a per-token KL penalty in the reward (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022)."""

    name: Literal["ppo"] = "ppo"
    kl_coef: float = Field(0.05, ge=0, description="initial beta of the KL penalty -beta * KL added to each token's reward")
    adaptive_kl: bool = Field(False, description="adapt beta toward task.target_kl (Ziegler et al. 2019)")
    target_kl: float = Field(6.0, gt=0, description="adaptive: target KL per completion (nats)")
    kl_horizon: int = Field(10000, ge=1, description="adaptive: horizon of the controller (completions)")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE")
    value_clip: float = Field(0.2, gt=0, description="clip of the value update around the rollout values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    whiten_advantages: bool = Field(True, description="normalise advantages over each batch of experience")


class GrpoConfig(RolloutConfig):
    """GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no value model, KL in the loss."""

    name: Literal["grpo"] = "grpo"
    group_size: int = Field(4, ge=2, description="completions sampled per prompt (G)")
    beta: float = Field(0.04, ge=0, description="weight of the per-token k3 KL to the reference in the loss")
    scale_rewards: bool = Field(True, description="divide group-centred rewards by the group's std")
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch of experience (the paper's mu)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="per-token KL to the reference in the loss (the paper: k3, unbiased and positive)")

    def rollouts(self, run: Any) -> int:
        return run.train.batch_size * self.group_size
