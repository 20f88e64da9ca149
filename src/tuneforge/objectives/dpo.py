"""Direct Preference Optimization (``task: dpo``; Rafailov et al. 2023) with ``task.loss``: ``sigmoid`` (DPO),
``ipo`` (Azar et al. 2023), ``hinge`` (SLiC, Zhao et al. 2023) or ``robust`` (Chowdhury et al. 2024).

The policy is the causal LM under the run's method; the reference is the base model before the method (see
`preference_lm`). Loss: `preference_losses.dpo_loss` on summed response log-probs (IPO: averaged per
token), ``task.beta`` 0.1. Metrics over a split: ``loss``; the implicit rewards ``beta * (log pi - log ref)``:
``reward_accuracy`` (chosen > rejected; a tie counts half, so step 0 scores 0.5), ``reward_margin``, ``chosen_reward``,
``rejected_reward``; the policy's mean ``chosen_logps`` / ``rejected_logps``. With policy = reference (step
0) the rewards are 0: the loss is ln 2 (sigmoid), 1 (hinge) or (1 / (2 beta))^2 (IPO).
"""

from __future__ import annotations

import torch

from tuneforge.objectives.configs.dpo import DpoConfig
from tuneforge.objectives.preference_lm import PreferenceLMObjective, PreferenceOutputs
from tuneforge.objectives.preference_losses import dpo_loss, pairwise_accuracy

__all__ = ["DpoConfig", "DpoObjective", "pair_metrics"]


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """``reward_accuracy``, ``reward_margin``, ``chosen_reward``, ``rejected_reward`` from implicit rewards [N]."""
    return {"reward_accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
            "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
            "chosen_reward": float(chosen_rewards.mean()), "rejected_reward": float(rejected_rewards.mean())}


class DpoObjective(PreferenceLMObjective):
    """Implements the `Objective` protocol for DPO and its IPO / hinge / robust variants."""

    name = "dpo"

    def _losses(self, logps: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-pair losses from [2B] (training) or [N, 2] (evaluation) log-probs, chosen first."""
        t = self.run.task
        pc, pr = logps.reshape(2, -1) if logps.dim() == 1 else logps.T
        rc, rr = ref.reshape(2, -1) if ref.dim() == 1 else ref.T
        nc, nr = tokens.reshape(2, -1) if tokens.dim() == 1 else tokens.T
        return dpo_loss(pc, pr, rc, rr, beta=t.beta, loss_type=t.loss, label_smoothing=t.label_smoothing,
                        chosen_tokens=nc.to(pc.dtype), rejected_tokens=nr.to(pc.dtype))

    def loss(self, outputs: PreferenceOutputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._losses(outputs.logps, outputs.ref_logps, outputs.tokens).mean()

    def metrics(self, out: PreferenceOutputs, extra: dict[str, torch.Tensor]) -> dict[str, float]:
        beta = self.run.task.beta
        rewards = beta * (out.logps - out.ref_logps)  # [N, 2]
        return {"loss": float(self._losses(out.logps, out.ref_logps, out.tokens).mean()),
                **pair_metrics(rewards[:, 0], rewards[:, 1]),
                "chosen_logps": float(out.logps[:, 0].mean()), "rejected_logps": float(out.logps[:, 1].mean())}


OBJECTIVE = DpoObjective
