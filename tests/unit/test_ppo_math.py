"""The arithmetic of PPO/GRPO (`objectives.rl_math`) against formulas and hand-worked examples."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.objectives.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    masked_whiten,
    policy_loss,
    value_loss,
)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_values() -> None:
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = _mask([6, 3, 1, 5], 6)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = rewards * mask
    to_go = r.flip(1).cumsum(1).flip(1)  # sum_{k >= t} r_k
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-6)
    assert torch.allclose(ret, to_go * mask, atol=1e-6)  # returns = A + V
    assert (adv[mask == 0] == 0).all()


def test_gae_equals_a_hand_computed_example() -> None:
    # gamma 0.9, lambda 0.8, three tokens, V after the last = 0
    r, v = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]])
    d2 = 2.0 - 1.5  # 0.5
    d1 = 0.0 + 0.9 * 1.5 - 1.0  # 0.35
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    a2 = d2
    a1 = d1 + 0.72 * a2  # 0.71
    a0 = d0 + 0.72 * a1  # 1.9112
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5])


def test_adaptive_kl_controller_follows_ziegler_formula() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(7.5, 64)  # error = 7.5/6 - 1 = 0.25, clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000))
    ctl.update(4.5, 32)  # error = -0.25 -> -0.2
    expected = 0.2 * (1 + 0.2 * 64 / 10000) * (1 - 0.2 * 32 / 10000)
    assert ctl.value == pytest.approx(expected)
    ctl.update(6.6, 100)  # error 0.1, not clipped
    expected *= 1 + 0.1 * 100 / 10000
    assert ctl.value == pytest.approx(expected)
    again = AdaptiveKLController(1.0, 1.0, 1)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_kl_estimators_match_their_formulas_and_the_exact_kl() -> None:
    logp, ref = torch.tensor([-1.0, -2.5, -0.1]), torch.tensor([-1.5, -2.0, -0.1])
    lr = logp - ref
    assert torch.allclose(kl_estimate(logp, ref, "k1"), lr)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * lr**2)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(ref - logp) - 1 - (ref - logp))
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    # both unbiased: their means over samples from pi approach KL(pi || ref)
    g = torch.Generator().manual_seed(0)
    pi, q = torch.softmax(torch.randn(8, generator=g), 0), torch.softmax(torch.randn(8, generator=g), 0)
    exact = float((pi * (pi.log() - q.log())).sum())
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        assert float(kl_estimate(pi.log()[x], q.log()[x], kind).mean()) == pytest.approx(exact, rel=0.03)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_clipped_surrogate_and_value_loss_by_hand() -> None:
    mask = torch.ones(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    old = torch.zeros(1, 3)
    loss, frac = policy_loss(old, old, adv, mask, clip=0.2)  # ratio 1: loss = -mean(A)
    assert float(loss) == pytest.approx(-2.0 / 3) and float(frac) == 0.0
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5]]))  # ratios 1.5, 1.5, 0.5
    loss, frac = policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(1.5, 1.2) = 1.5; token 2: max(-1.0, -1.6) = -1.0
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 1.0) / 3) and float(frac) == pytest.approx(1 / 3)
    v, v_old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.1]])
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(0.01, 0.01); 0.5 * mean
    assert float(value_loss(v, v_old, ret, torch.ones(1, 2), clip=0.2)) == pytest.approx(0.5 * (3.24 + 0.01) / 2)


def test_whitening_and_group_advantages() -> None:
    x, mask = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    kept = w[mask.bool()]
    assert float(kept.mean()) == pytest.approx(0.0, abs=1e-6) and float(kept.var(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    assert (w[~mask.bool()] == 0).all()
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    adv = group_advantages(scores, group_size=3, scale=True, eps=0.0)
    assert adv[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])  # std of (1, 2, 3) = 1
    s2 = float(torch.tensor([0.0, 0.0, 4.0]).std())  # unbiased, as torch.std and the paper's implementations
    assert adv[3:].tolist() == pytest.approx([(-4 / 3) / s2, (-4 / 3) / s2, (8 / 3) / s2])
    assert group_advantages(scores, 3, scale=False)[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_grpo_loss_averages_per_completion_then_over_completions() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    logp = torch.zeros(2, 4)
    adv = torch.tensor([[1.0] * 4, [-3.0] * 4]) * mask
    loss, _ = grpo_loss(logp, logp, logp, adv, mask, clip=0.2, beta=0.0)
    assert float(loss) == pytest.approx((-1.0 + 3.0) / 2)  # a token mean would give (-4 + 3) / 5
    ref = torch.full((2, 4), -0.5)
    with_kl, _ = grpo_loss(logp, logp, ref, adv, mask, clip=0.2, beta=0.1)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert float(with_kl) == pytest.approx(1.0 + 0.1 * k3)
