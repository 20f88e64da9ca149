"""Batch plans (deterministic, complete, length-grouped) and collation with dynamic padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.data.batching import TensorBatches, TokenBatches, plan_batches


def _flat(plan: list[list[int]]) -> list[int]:
    return [i for batch in plan for i in batch]


def _padding_waste(plan: list[list[int]], lengths: np.ndarray) -> float:
    """Share of the padded token grid that is padding."""
    grid = sum(int(lengths[b].max()) * len(b) for b in plan)
    return 1 - int(lengths.sum()) / grid


def _lengths(n: int = 2000, seed: int = 0) -> np.ndarray:
    # a long-tailed sentence-length distribution (most short, some long), 3..300 tokens
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=3.0, sigma=0.8, size=n).astype(np.int64), 3, 300)


# --------------------------------------------------------------------------- plan_batches
@pytest.mark.parametrize("group_by_length", [False, True])
def test_plan_is_deterministic_per_seed_and_epoch(group_by_length: bool) -> None:
    lengths = _lengths(500)
    kw = {"shuffle": True, "group_by_length": group_by_length}
    a = plan_batches(lengths, 500, 16, seed=7, epoch=0, **kw)
    assert a == plan_batches(lengths, 500, 16, seed=7, epoch=0, **kw)
    assert a != plan_batches(lengths, 500, 16, seed=7, epoch=1, **kw)
    assert a != plan_batches(lengths, 500, 16, seed=8, epoch=0, **kw)
    epochs = [plan_batches(lengths, 500, 16, seed=7, epoch=e, **kw) for e in range(4)]
    assert len({tuple(map(tuple, p)) for p in epochs}) == 4


@pytest.mark.parametrize(
    ("n", "batch_size", "group_by_length"),
    [(500, 16, False), (500, 16, True), (1037, 8, True), (5, 8, True), (64, 1, True)],
)
def test_plan_covers_every_index_once(n: int, batch_size: int, group_by_length: bool) -> None:
    lengths = _lengths(n)
    for epoch in range(3):
        plan = plan_batches(
            lengths, n, batch_size, seed=1, epoch=epoch, shuffle=True, group_by_length=group_by_length
        )
        flat = _flat(plan)
        assert sorted(flat) == list(range(n))
        assert len(plan) == -(-n // batch_size)  # ceil: only the last batch of a run may be short
        assert all(1 <= len(b) <= batch_size for b in plan)
        assert sum(len(b) < batch_size for b in plan) <= 1
        assert all(isinstance(i, int) for i in flat)


def test_plan_without_shuffle() -> None:
    lengths = np.array([5, 1, 4, 1, 3])
    assert plan_batches(lengths, 5, 2, seed=0, epoch=0, shuffle=False, group_by_length=False) == [
        [0, 1],
        [2, 3],
        [4],
    ]
    # evaluation order sorted by length (stable) when grouping: least padding, deterministic
    assert plan_batches(lengths, 5, 2, seed=0, epoch=3, shuffle=False, group_by_length=True) == [
        [1, 3],
        [4, 2],
        [0],
    ]
    assert plan_batches(None, 5, 2, seed=0, epoch=0, shuffle=False, group_by_length=True) == [
        [0, 1],
        [2, 3],
        [4],
    ]


def test_plan_without_lengths_ignores_grouping() -> None:
    a = plan_batches(None, 100, 8, seed=3, epoch=2, shuffle=True, group_by_length=True)
    b = plan_batches(None, 100, 8, seed=3, epoch=2, shuffle=True, group_by_length=False)
    assert a == b
    assert sorted(_flat(a)) == list(range(100))


def test_group_by_length_cuts_padding() -> None:
    lengths = _lengths(2000)
    kw = {"seed": 0, "shuffle": True}
    random_plan = plan_batches(lengths, 2000, 32, epoch=0, group_by_length=False, **kw)
    grouped = plan_batches(lengths, 2000, 32, epoch=0, group_by_length=True, **kw)
    waste_random = _padding_waste(random_plan, lengths)
    waste_grouped = _padding_waste(grouped, lengths)
    assert waste_random > 0.5  # long tail: random batches are mostly padding
    assert waste_grouped < waste_random / 3
    # each grouped batch is a run of the length-sorted chunk: lengths non-increasing inside
    for b in grouped:
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)


def test_grouped_batches_are_still_shuffled() -> None:
    lengths = _lengths(2000)
    grouped = plan_batches(lengths, 2000, 32, seed=0, epoch=0, shuffle=True, group_by_length=True)
    firsts = [int(lengths[b[0]]) for b in grouped]
    assert firsts != sorted(firsts, reverse=True)
    assert firsts != sorted(firsts)
    # with 2000 < 32 * 64 rows there is a single chunk: the batches are those of the sorted chunk
    order = np.random.default_rng([0, 0]).permutation(2000)
    chunk = order[np.argsort(-lengths[order], kind="stable")]
    expected = {tuple(chunk[i : i + 32].tolist()) for i in range(0, 2000, 32)}
    assert {tuple(b) for b in grouped} == expected


def test_group_size_one_is_random_batches_in_random_order() -> None:
    lengths = _lengths(300)
    plain = plan_batches(lengths, 300, 10, seed=5, epoch=1, shuffle=True, group_by_length=False)
    grouped = plan_batches(
        lengths, 300, 10, seed=5, epoch=1, shuffle=True, group_by_length=True, group_size=1
    )
    assert {frozenset(b) for b in plain} == {frozenset(b) for b in grouped}


def test_grouping_is_local_to_chunks() -> None:
    # two chunks (batch 4 * group 2 = 8 rows each): a batch never mixes rows of different chunks
    lengths = np.arange(16)
    plan = plan_batches(lengths, 16, 4, seed=2, epoch=0, shuffle=True, group_by_length=True, group_size=2)
    order = np.random.default_rng([2, 0]).permutation(16)
    chunks = [set(order[:8].tolist()), set(order[8:].tolist())]
    for b in plan:
        assert any(set(b) <= c for c in chunks)


# --------------------------------------------------------------------------- TokenBatches
def _token_batches(**kw) -> TokenBatches:
    columns = {
        "input_ids": [[101, 7, 8, 102], [101, 9, 102], [101, 5, 6, 7, 8, 9, 102], [101, 102]],
        "token_type_ids": [[0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1, 1, 1], [1, 1]],
        "labels": [2, 0, 1, 1],
    }
    return TokenBatches(columns, pad_id=3, **kw)


def test_token_batches_collate_pads_to_batch_max() -> None:
    data = _token_batches()
    assert len(data) == 4
    assert data.lengths.tolist() == [4, 3, 7, 2]
    assert data.num_tokens == 16
    b = data.collate([1, 0, 3])
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert b["input_ids"].shape == (3, 4)  # longest of the batch, not of the data (7)
    assert b["input_ids"].tolist() == [[101, 9, 102, 3], [101, 7, 8, 102], [101, 102, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["attention_mask"].sum(-1).tolist() == [3, 4, 2]
    assert b["token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]]  # padded with 0
    assert b["labels"].tolist() == [0, 2, 1]
    for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert b[k].dtype == torch.int64, k
    full = data.collate(range(4))
    assert full["input_ids"].shape == (4, 7)
    assert int(full["attention_mask"].sum()) == data.num_tokens
    assert data.collate([2])["input_ids"].shape == (1, 7)


def test_token_batches_without_token_types_and_float_fields() -> None:
    data = TokenBatches({"input_ids": [[1, 2], [1, 2, 3]], "labels": [0.5, 1.5], "weight": [1, 2]}, pad_id=0)
    b = data.collate([0, 1])
    assert set(b) == {"input_ids", "attention_mask", "labels", "weight"}
    assert b["input_ids"].tolist() == [[1, 2, 0], [1, 2, 3]]
    assert b["labels"].dtype == torch.float32 and b["labels"].tolist() == [0.5, 1.5]
    assert b["weight"].tolist() == [1, 2]


def test_token_batches_plan_uses_lengths_and_flag() -> None:
    data = _token_batches()
    assert data.plan(0, 2, seed=0, shuffle=False) == [[3, 1], [0, 2]]
    ungrouped = _token_batches(group_by_length=False)
    assert ungrouped.plan(0, 2, seed=0, shuffle=False) == [[0, 1], [2, 3]]
    assert data.plan(4, 2, seed=9, shuffle=True) == plan_batches(
        data.lengths, 4, 2, seed=9, epoch=4, shuffle=True, group_by_length=True
    )


# --------------------------------------------------------------------------- TensorBatches
def test_tensor_batches() -> None:
    feats = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    labels = torch.arange(10) % 2
    data = TensorBatches({"features": feats, "labels": labels})
    assert len(data) == 10
    b = data.collate([4, 0, 9])
    assert torch.equal(b["features"], feats[[4, 0, 9]])
    assert b["labels"].tolist() == [0, 0, 1]
    plan = data.plan(0, 4, seed=1, shuffle=True)
    assert sorted(_flat(plan)) == list(range(10))
    assert [len(x) for x in plan] == [4, 4, 2]
    assert plan == data.plan(0, 4, seed=1, shuffle=True)
    assert plan != data.plan(1, 4, seed=1, shuffle=True)
    assert data.plan(0, 4, seed=1, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_tensor_batches_size_mismatch() -> None:
    with pytest.raises(ValueError, match="disagree"):
        TensorBatches({"features": torch.zeros(3, 2), "labels": torch.zeros(4)})


def test_group_by_length_on_real_sentences(shared_data) -> None:
    """The same saving on SST-2 sentences tokenized by tiny-bert (real, long-tailed lengths)."""
    from transformers import AutoTokenizer

    from tuneforge.models import resolve_model

    path = shared_data / "sst2" / "train.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with path.open(encoding="utf-8") as f:
        next(f)  # header
        texts = [line.split("\t", 1)[0] for _, line in zip(range(3000), f, strict=False)]
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))
    ids = tok(texts, truncation=True, max_length=128)["input_ids"]
    data = TokenBatches({"input_ids": ids, "labels": [0] * len(ids)}, pad_id=tok.pad_token_id)
    grouped = data.plan(0, 32, seed=0, shuffle=True)
    plain = TokenBatches({"input_ids": ids}, pad_id=0, group_by_length=False).plan(
        0, 32, seed=0, shuffle=True
    )
    waste_grouped, waste_plain = _padding_waste(grouped, data.lengths), _padding_waste(plain, data.lengths)
    assert waste_grouped < waste_plain / 3
    b = data.collate(grouped[0])
    assert b["input_ids"].shape == (32, int(data.lengths[grouped[0]].max()))
