"""GRPO (``task: grpo``; Shao et al. 2024, "DeepSeekMath"): PPO without a value model.

Each prompt gets ``task.group_size`` sampled completions; a completion's advantage is its reward minus the
mean reward of its group (divided by the group's standard deviation with ``task.scale_rewards``), shared by
all its tokens. The loss is the clipped surrogate plus ``task.beta`` times the per-token k3 KL to the
reference, averaged over each completion's tokens and then over completions (the paper's eq. 3). It runs in
the same rollout loop as PPO (`tuneforge.engine.rollout`); data, evaluation and saved runs are PPO's
(`objectives.ppo`).
"""

from __future__ import annotations

from tuneforge.objectives.configs.ppo import GrpoConfig
from tuneforge.objectives.ppo import RolloutObjective

__all__ = ["GrpoConfig", "GrpoObjective"]


class GrpoObjective(RolloutObjective):
    """``task: grpo``: group-relative advantages, no value head."""

    name = "grpo"
    value_head = False


OBJECTIVE = GrpoObjective
