"""SimPO (``task: simpo``; Meng et al. 2024): preference optimisation without a reference model.

The implicit reward is the policy's *average* response log-prob scaled by ``task.beta`` (2.0), and the loss
asks the chosen reward to beat the rejected one by the margin ``task.gamma`` (0.5):
``-log sigmoid(beta (avg log pi(y_c) - avg log pi(y_r)) - gamma)`` (`preference_losses.simpo_loss`; label
smoothing as cDPO). No reference log-probs are computed at all. Metrics over a split: ``loss``,
``reward_accuracy`` (a tie counts half), ``reward_margin``, ``chosen_reward`` / ``rejected_reward`` and the
policy's mean summed ``chosen_logps`` / ``rejected_logps``.
"""

from __future__ import annotations

import torch

from tuneforge.objectives.configs.dpo import SimpoConfig
from tuneforge.objectives.dpo import pair_metrics
from tuneforge.objectives.preference_lm import PreferenceLMObjective, PreferenceOutputs
from tuneforge.objectives.preference_losses import simpo_loss

__all__ = ["SimpoConfig", "SimpoObjective"]


class SimpoObjective(PreferenceLMObjective):
    """Implements the `Objective` protocol for SimPO (reference-free)."""

    name = "simpo"
    needs_reference = False

    def _losses(self, logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = self.run.task
        pc, pr = logps.reshape(2, -1) if logps.dim() == 1 else logps.T
        nc, nr = tokens.reshape(2, -1) if tokens.dim() == 1 else tokens.T
        return simpo_loss(pc, pr, nc.to(pc.dtype), nr.to(pc.dtype), beta=t.beta, gamma=t.gamma,
                          label_smoothing=t.label_smoothing)

    def loss(self, outputs: PreferenceOutputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._losses(outputs.logps, outputs.tokens).mean()

    def metrics(self, out: PreferenceOutputs, extra: dict[str, torch.Tensor]) -> dict[str, float]:
        rewards = self.run.task.beta * out.logps / out.tokens.clamp(min=1)  # [N, 2]
        return {"loss": float(self._losses(out.logps, out.tokens).mean()), **pair_metrics(rewards[:, 0], rewards[:, 1]),
                "chosen_logps": float(out.logps[:, 0].mean()), "rejected_logps": float(out.logps[:, 1].mean())}


OBJECTIVE = SimpoObjective
