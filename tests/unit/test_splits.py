"""The seeded train/validation rule shared by the record-reading objectives (`tuneforge.data.splits`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from tuneforge.config.schema import DataConfig
from tuneforge.data.splits import seeded_carve, seeded_sample, train_validation
from tuneforge.errors import DataError


@dataclass
class Rows:
    items: list[int]

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> Rows:
        return Rows([self.items[i] for i in indices])


def test_seeded_sample_and_carve_are_pure_functions_of_the_seed() -> None:
    assert seeded_sample(10, 4, 3) == seeded_sample(10, 4, 3) == sorted(
        np.random.default_rng(3).choice(10, size=4, replace=False).tolist())
    keep, held = seeded_carve(10, 0.25, 7)
    perm = np.random.default_rng(7).permutation(10)
    assert held == sorted(perm[:2].tolist()) and keep == sorted(perm[2:].tolist())  # round(2.5) = 2
    assert sorted(keep + held) == list(range(10))
    assert seeded_carve(3, 0.01, 0)[1] != []  # at least one row is held out


def test_train_validation_samples_then_carves_then_caps_the_eval_rows() -> None:
    data = DataConfig(train="t.jsonl", validation_split=0.2, max_train_samples=50, max_eval_samples=4)
    train, val, notes = train_validation(Rows(list(range(100))), lambda: pytest.fail("no file to read"), data, 5)
    sampled = seeded_sample(100, 50, 5)
    keep, held = seeded_carve(50, 0.2, 5)
    assert train.items == [sampled[i] for i in keep]
    assert val.items == [[sampled[i] for i in held][j] for j in seeded_sample(10, 4, 5)]
    assert not set(train.items) & set(val.items)
    assert notes == ["train: a seeded random sample of 50 examples of t.jsonl",
                     "validation: 10 of 50 examples carved from t.jsonl (seeded, seed 5)"]


def test_train_validation_reads_the_validation_file_when_given() -> None:
    data = DataConfig(train="t.jsonl", validation="v.jsonl")
    train, val, notes = train_validation(Rows([1, 2, 3]), lambda: Rows([9]), data, 0, what="pairs")
    assert (train.items, val.items, notes) == ([1, 2, 3], [9], [])


def test_one_record_cannot_be_carved() -> None:
    with pytest.raises(DataError, match=r"t\.jsonl: too few pairs \(1\)"):
        train_validation(Rows([1]), lambda: Rows([]), DataConfig(train="t.jsonl"), 0, what="pairs")
