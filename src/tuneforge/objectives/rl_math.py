"""The arithmetic of policy-gradient fine-tuning, as plain functions over tensors (tested against formulas).

Token tensors are ``[B, R]`` (completions x response positions) with a ``mask`` that is 1 on each
completion's tokens (contiguous from position 0, up to and including its end-of-sequence token).

* KL estimators (Schulman 2020, "Approximating KL divergence"), for tokens sampled from the policy pi with
  ``log_ratio = log pi - log ref``: k1 = log_ratio (unbiased, can be negative per token), k2 = log_ratio^2 / 2,
  k3 = exp(-log_ratio) - 1 + log_ratio (unbiased and never negative). The log-ratio is clamped to +-20 before
  the exponential of k3 so one improbable token cannot overflow it.
* GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, with
  V = 0 after the last token; returns = A + V. With gamma = lambda = 1, A_t = sum_{k >= t} r_k - V_t.
* PPO (Schulman et al. 2017): clipped surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = pi / pi_old;
  clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2) (as in OpenAI's baselines).
* KL controllers (Ziegler et al. 2019, section 2.2): fixed beta, or adaptive
  beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) after each batch of n completions.
* GRPO (Shao et al. 2024): each completion's advantage is its reward minus its group's mean, divided by the
  group's standard deviation (optional, ``scale``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "gae",
    "group_advantages",
    "grpo_loss",
    "kl_controller",
    "kl_estimate",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over ``dim``, or everything)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0 and variance 1 over the masked entries (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi (see module docstring)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; allowed: k1, k2, k3")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, R] by generalised advantage estimation; both 0 outside ``mask``."""
    rewards, values = rewards * mask, values * mask
    n = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean clipped surrogate loss, share of tokens where the clipped term was taken)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Token-mean clipped value loss (see module docstring)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages [B * G] of rewards [B * G] laid out group by group (prompt i's G completions together)."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip: float, beta: float, kind: str = "k3") -> tuple[torch.Tensor, torch.Tensor]:
    """(GRPO loss, clip fraction): per token the clipped surrogate plus ``beta`` times the KL estimate to the
    reference, averaged over each completion's tokens, then over completions (Shao et al. 2024, eq. 3)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if beta:
        per_token = per_token + beta * kl_estimate(logp, ref_logp, kind)
    loss = masked_mean(per_token, mask, dim=1).mean()
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


class FixedKLController:
    """A constant beta."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019's proportional controller of beta toward a target KL (see module docstring)."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(task: Any) -> FixedKLController:
    """The controller a ``task`` block asks for (``adaptive_kl``, ``kl_coef``, ``target_kl``, ``kl_horizon``)."""
    if getattr(task, "adaptive_kl", False):
        return AdaptiveKLController(task.kl_coef, task.target_kl, task.kl_horizon)
    return FixedKLController(getattr(task, "kl_coef", getattr(task, "beta", 0.0)))
