"""Preference losses: the oracles at policy = reference, hand arithmetic, and parity with TRL's own loss code
(``DPOTrainer._compute_loss``, ``RewardTrainer.compute_loss``, run on a stand-in trainer and model that hand
them the same random log-probs / rewards)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.objectives.preference_losses import (
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    pairwise_accuracy,
    simpo_loss,
)

BETA = 0.1


def _logps(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 40 + 5) for _ in range(4)]


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize(("loss_type", "expected"), [
    ("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * BETA)) ** 2),
])
def test_policy_equal_to_reference_gives_the_known_loss(loss_type: str, expected: float) -> None:
    pc, pr, _, _ = _logps()
    tokens = torch.full_like(pc, 7.0)
    smoothing = 0.2 if loss_type == "robust" else 0.0
    loss = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=BETA, loss_type=loss_type, label_smoothing=smoothing,
                    chosen_tokens=tokens, rejected_tokens=tokens)
    assert torch.allclose(loss, torch.full_like(loss, expected))


def test_reward_loss_with_equal_scores_is_ln2_and_kto_is_half() -> None:
    r = torch.randn(5)
    assert math.isclose(float(bradley_terry_loss(r, r.clone())), math.log(2), rel_tol=1e-6)
    # KTO with policy = reference and KL 0: every example loses 1 - sigmoid(0) = 0.5
    pol = torch.randn(6)
    loss = kto_loss(pol, pol.clone(), torch.tensor([True, False] * 3), torch.tensor(0.0), beta=BETA)
    assert torch.allclose(loss, torch.full((6,), 0.5))


def test_hand_worked_values() -> None:
    # d = (-10 - -12) - (-20 - -19) = 3; beta d = 0.3
    args = (torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-19.0]))
    assert math.isclose(float(dpo_loss(*args, beta=BETA)), math.log1p(math.exp(-0.3)), rel_tol=1e-6)
    assert math.isclose(float(dpo_loss(*args, beta=BETA, loss_type="hinge")), 0.7, rel_tol=1e-6)
    # cDPO: 0.9 * softplus(-0.3) + 0.1 * softplus(0.3)
    cdpo = 0.9 * math.log1p(math.exp(-0.3)) + 0.1 * math.log1p(math.exp(0.3))
    assert math.isclose(float(dpo_loss(*args, beta=BETA, label_smoothing=0.1)), cdpo, rel_tol=1e-6)
    # IPO: per-token ratios 2/4 - (-1)/2 = 1; (1 - 5)^2 = 16
    ipo = dpo_loss(*args, beta=BETA, loss_type="ipo", chosen_tokens=torch.tensor([4.0]),
                   rejected_tokens=torch.tensor([2.0]))
    assert math.isclose(float(ipo), 16.0, rel_tol=1e-6)
    # Bradley-Terry with margin and centring: -logsigmoid(2 - 0.5 - 1) + 0.01 * (2.5)^2
    bt = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([1.0]), 0.01)
    assert math.isclose(float(bt), math.log1p(math.exp(-0.5)) + 0.01 * 6.25, rel_tol=1e-6)
    # SimPO: beta (avg_c - avg_r) - gamma = 2 * (-10/5 - -20/5) - 0.5 = 3.5
    simpo = simpo_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([5.0]), torch.tensor([5.0]))
    assert math.isclose(float(simpo), math.log1p(math.exp(-3.5)), rel_tol=1e-6)
    # a tie counts half
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == 0.5


# --------------------------------------------------------------------------- TRL parity


def _trl_dpo_loss(loss_type: str, pc, pr, rc, rr, tokens_c, tokens_r, label_smoothing: float = 0.0) -> torch.Tensor:
    """TRL 1.16's ``DPOTrainer._compute_loss`` on summed log-probs: a stand-in model returns per-token log-probs
    whose sums are ``pc``/``pr`` spread over ``tokens_*`` completion positions; reference log-probs precomputed."""
    from trl.trainer.dpo_trainer import DPOTrainer

    b = pc.shape[0]
    width = int(max(tokens_c.max(), tokens_r.max())) + 2
    mask = torch.zeros(2 * b, width, dtype=torch.long)
    for i, n in enumerate(torch.cat([tokens_c, tokens_r]).long().tolist()):
        mask[i, 1 : 1 + n] = 1
    per_token = (mask[:, 1:].float() * (torch.cat([pc, pr]) / torch.cat([tokens_c, tokens_r]))[:, None])
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                              is_top1=zeros.bool(), aux_loss=None)
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=BETA, label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)


@pytest.mark.parametrize(("loss_type", "smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_losses_equal_trl(loss_type: str, smoothing: float) -> None:
    pc, pr, rc, rr = _logps(8, seed=3)
    g = torch.Generator().manual_seed(1)
    tc, tr = (torch.randint(3, 12, (8,), generator=g).float() for _ in range(2))
    ours = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=smoothing,
                    chosen_tokens=tc, rejected_tokens=tr).mean()
    theirs = _trl_dpo_loss(loss_type, pc, pr, rc, rr, tc, tr, smoothing)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (float(ours), float(theirs))


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_equals_trl(with_margin: bool) -> None:
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(2 * 6, 1, generator=g)
    margin = torch.rand(6, generator=g) if with_margin else None
    accel = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=accel, _tp_size=1,
                           args=SimpleNamespace(center_rewards_coefficient=0.01), _total_train_tokens=0,
                           _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    theirs = RewardTrainer.compute_loss(fake, lambda **kw: SimpleNamespace(logits=rewards), inputs)
    chosen, rejected = rewards.squeeze(-1).chunk(2)
    ours = bradley_terry_loss(chosen, rejected, margin, 0.01)
    assert torch.allclose(ours, theirs, rtol=1e-6), (float(ours), float(theirs))


def test_kto_loss_equals_trl_formula_with_clamped_detached_kl() -> None:
    """TRL's KTO loss (kto_trainer.py: ``1 - sigmoid(beta (logratio - kl))`` / ``1 - sigmoid(beta (kl -
    logratio))``, kl clamped at 0) written out; a negative KL estimate counts as 0 and takes no gradient."""
    pol, ref = torch.randn(6, requires_grad=True), torch.randn(6)
    desirable = torch.tensor([True, True, False, True, False, False])
    kl = torch.tensor(-0.3, requires_grad=True)
    loss = kto_loss(pol, ref, desirable, kl, beta=BETA, desirable_weight=1.5, undesirable_weight=0.7)
    r = pol.detach() - ref
    expected = torch.where(desirable, 1.5 * (1 - torch.sigmoid(BETA * r)), 0.7 * (1 - torch.sigmoid(-BETA * r)))
    assert torch.allclose(loss.detach(), expected)
    loss.sum().backward()
    assert kl.grad is None and pol.grad is not None
