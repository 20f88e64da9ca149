"""Seeded training / validation splits for the objectives that read whole records into memory.

One rule for all of them (SFT, seq2seq, contrastive, preference, PPO/GRPO prompts, token classification): a
seeded random sample of ``data.max_train_samples`` records; then ``data.validation`` if given, else a seeded
``data.validation_split`` share carved out of the training records; then a seeded sample of
``data.max_eval_samples`` validation records. Each draw is a pure function of ``train.seed`` (a resumed run
sees the same splits) and indices are kept in file order. The records are any object with ``len`` and
``subset(indices)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import numpy as np

from tuneforge.config.schema import DataConfig
from tuneforge.errors import DataError

__all__ = ["seeded_carve", "seeded_sample", "train_validation"]


class _Records(Protocol):
    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int]) -> _Records: ...


R = TypeVar("R", bound=_Records)


def seeded_sample(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)`` drawn without replacement by ``seed``, in increasing order."""
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def seeded_carve(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) indices of ``range(n)``: ``max(1, round(share * n))`` held out by a seeded permutation."""
    k = max(1, round(share * n))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())


def train_validation(train: R, read_validation: Callable[[], R], data: DataConfig, seed: int,
                     *, what: str = "examples", source: object = None) -> tuple[R, R, list[str]]:
    """(train, validation, notes) under the rule above; ``read_validation`` reads ``data.validation``.

    Too few training records to carve from (none would be left to train on) is a `DataError` naming
    ``source`` (default ``data.train``); the notes say what was sampled and carved, for the run's report.
    """
    source = data.train if source is None else source
    notes: list[str] = []
    if data.max_train_samples and data.max_train_samples < len(train):
        train = train.subset(seeded_sample(len(train), data.max_train_samples, seed))
        notes.append(f"train: a seeded random sample of {data.max_train_samples} {what} of {source}")
    if data.validation is not None:
        val = read_validation()
    else:
        keep, held = seeded_carve(len(train), data.validation_split, seed)
        if not keep:
            raise DataError(f"too few {what} ({len(train)}) to hold out a validation split; give data.validation",
                            source)
        train, val = train.subset(keep), train.subset(held)
        notes.append(f"validation: {len(held)} of {len(keep) + len(held)} {what} carved from {source} "
                     f"(seeded, seed {seed})")
    if data.max_eval_samples and data.max_eval_samples < len(val):
        val = val.subset(seeded_sample(len(val), data.max_eval_samples, seed))
    return train, val, notes
