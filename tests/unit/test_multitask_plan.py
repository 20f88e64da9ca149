"""Multi-task batch plans (`tuneforge.data.multitask`): one task per batch, the configured task frequencies,
every example exactly once under proportional sampling, and plans that are pure functions of (seed, epoch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneforge.data.batching import TokenBatches, num_batches
from tuneforge.data.multitask import MultiTaskBatches, task_probabilities, task_sequence


def _part(n: int, seed: int) -> TokenBatches:
    rng = np.random.default_rng(seed)
    return TokenBatches({"input_ids": [[1] * int(k) for k in rng.integers(2, 30, size=n)], "labels": [0] * n}, 0)


def _data(sampling: str, sizes=(200, 30, 70), temperature: float = 2.0) -> MultiTaskBatches:
    return MultiTaskBatches({f"t{i}": _part(n, i) for i, n in enumerate(sizes)}, sampling, temperature)


def test_probabilities_formula() -> None:
    p = task_probabilities([400, 100], "temperature", 2.0)
    assert p == pytest.approx([20 / 30, 10 / 30])  # sqrt(400) : sqrt(100)
    assert task_probabilities([400, 100], "proportional") == pytest.approx([0.8, 0.2])
    assert task_probabilities([400, 100], "round_robin") == pytest.approx([0.5, 0.5])
    assert task_probabilities([400, 100], "temperature", 1.0) == pytest.approx([0.8, 0.2])
    with pytest.raises(ValueError, match="allowed: proportional, temperature, round_robin"):
        task_probabilities([1], "uniform")


def test_proportional_uses_every_example_exactly_once_one_task_per_batch() -> None:
    data = _data("proportional")
    plan = data.plan(3, 8, seed=11, shuffle=True)
    assert len(plan) == num_batches(data, 8) == sum(math.ceil(n / 8) for n in (200, 30, 70))
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(len(data)))
    for b in plan:
        assert len({data.task_of(i) for i in b}) == 1
    tasks = [data.task_of(b[0]) for b in plan]
    assert tasks != sorted(tasks)  # interleaved, not task after task


def test_temperature_frequencies_match_the_configured_distribution() -> None:
    sizes = (2000, 200, 50)
    data = _data("temperature", sizes, temperature=2.0)
    seen = np.zeros(3)
    for epoch in range(12):
        for b in data.plan(epoch, 4, seed=5, shuffle=True):
            seen[data.task_of(b[0])] += 1
    freq = seen / seen.sum()
    expected = np.sqrt(sizes) / np.sqrt(sizes).sum()
    # 12 epochs x 563 batches: the standard error of each share is below 0.006
    assert np.abs(freq - expected).max() < 0.02, (freq, expected)
    # small tasks are drawn more often than they have batches: they start new passes over their own data
    plan = data.plan(0, 4, seed=5, shuffle=True)
    small = [i for b in plan if data.task_of(b[0]) == 2 for i in b]
    assert len(small) > sizes[2] and set(small) == set(range(data.offsets[2], data.offsets[3]))


def test_round_robin_takes_tasks_in_turn() -> None:
    data = _data("round_robin")
    tasks = [data.task_of(b[0]) for b in data.plan(0, 8, seed=1, shuffle=True)]
    assert tasks[:6] == [0, 1, 2, 0, 1, 2]
    assert task_sequence([3, 1], [30, 10], "round_robin", temperature=1, seed=0, epoch=0) == [0, 1, 0, 1]


@pytest.mark.parametrize("sampling", ["proportional", "temperature", "round_robin"])
def test_plan_is_a_pure_function_of_seed_and_epoch(sampling: str) -> None:
    a, b = _data(sampling), _data(sampling)
    assert a.plan(2, 8, seed=3, shuffle=True) == b.plan(2, 8, seed=3, shuffle=True)
    assert a.plan(2, 8, seed=3, shuffle=True) != a.plan(3, 8, seed=3, shuffle=True)


def test_collate_tags_the_task_and_refuses_mixed_batches() -> None:
    data = _data("proportional")
    batch = data.collate([data.offsets[1], data.offsets[1] + 1])
    assert int(batch["task"]) == 1 and batch["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="mixes tasks"):
        data.collate([0, data.offsets[1]])


def test_evaluation_plan_is_in_task_order_and_covers_every_example() -> None:
    data = _data("temperature")
    plan = data.plan(0, 16, seed=0, shuffle=False)
    assert sorted(i for b in plan for i in b) == list(range(len(data)))
    assert [data.task_of(b[0]) for b in plan] == sorted(data.task_of(b[0]) for b in plan)
