"""Preference losses as plain functions over tensors (checked against hand arithmetic and TRL's code).

* `bradley_terry_loss`: the reward-model loss of Ouyang et al. 2022 (InstructGPT, eq. 1) from the
  Bradley-Terry model (1952), ``-log sigmoid(r_c - r_r - margin)`` with Touvron et al. 2023's optional margin
  and Eisenstein et al. 2023's reward centring ``coef * mean((r_c + r_r)^2)`` (TRL ``RewardTrainer``).
* `dpo_loss`: Direct Preference Optimization (Rafailov et al. 2023) on summed response log-probs,
  ``d = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``:
  ``sigmoid`` ``-log sigmoid(beta d)``, with label smoothing eps the conservative cDPO
  ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)`` (Mitchell 2023);
  ``robust`` the unbiased noisy-label estimator of Chowdhury et al. 2024 (rDPO),
  ``((1 - eps) (-log sigmoid(beta d)) + eps log sigmoid(-beta d)) / (1 - 2 eps)``;
  ``hinge`` ``relu(1 - beta d)`` (SLiC, Zhao et al. 2023);
  ``ipo`` ``(d / n - 1 / (2 beta))^2`` with the log-ratios averaged per response token (Azar et al. 2023,
  IPO; the per-token average is what TRL does and what the IPO authors confirmed).
* `simpo_loss`: SimPO (Meng et al. 2024): no reference, length-normalised log-probs,
  ``-log sigmoid(beta (avg log pi(y_c) - avg log pi(y_r)) - gamma)``.
* `kto_loss`: KTO (Ethayarajh et al. 2024): desirable ``1 - sigmoid(beta (r - z))``, undesirable
  ``1 - sigmoid(beta (z - r))`` with r the log-ratio and z the detached, clamped (>= 0) batch KL estimate.

The implicit rewards reported with DPO/KTO are ``beta * (log pi - log ref)`` (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSSES", "bradley_terry_loss", "dpo_loss", "kto_loss", "pairwise_accuracy", "simpo_loss"]

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs scored chosen > rejected, a tie counting half: an untrained DPO policy (policy =
    reference, every implicit reward 0) scores the chance level 0.5 (TRL counts ties as misses: 0)."""
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """Mean ``-log sigmoid(r_c - r_r - margin)`` over pairs (+ ``coef * mean((r_c + r_r)^2)`` when given)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO-family losses [B] from summed response log-probs [B] (see module docstring).

    ``chosen_tokens`` / ``rejected_tokens``: response token counts, required by ``ipo``.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages log-ratios per token: give chosen_tokens and rejected_tokens")
        d = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (d - 1 / (2 * beta)) ** 2
    d = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * d)
        flipped = -label_smoothing * F.logsigmoid(-beta * d)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss '{loss_type}'; allowed: {', '.join(DPO_LOSSES)}")


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO losses [B]: ``beta`` scales the per-token average log-probs, ``gamma`` is the target
    reward margin (the paper's gamma; TRL's CPO takes ``simpo_gamma`` the same way)."""
    d = policy_chosen / chosen_tokens.clamp(min=1) - policy_rejected / rejected_tokens.clamp(min=1)
    logits = beta * d - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example KTO losses [B] from summed log-probs [B], the boolean ``desirable`` mask [B] and the batch
    KL estimate ``kl`` (a scalar: detached and clamped at 0 here, as the paper's z_0)."""
    z = kl.detach().clamp(min=0)
    ratio = policy - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio)))
    return torch.where(desirable, good, bad)
