"""What the preference objectives (``reward``, ``dpo``, ``simpo``, ``kto``) share: reading the splits.

Splits come from ``data.train`` / ``data.validation`` / ``data.test`` (a validation share is carved from the
training pairs, seeded, when no validation file is given); ``data.max_train_samples`` and
``data.max_eval_samples`` take seeded random samples. Skipped rows (chosen == rejected, malformed rows under
``task.invalid: skip``) are counted in the run's notes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config.schema import RunConfig
from tuneforge.data.preference import Preferences, read_preferences
from tuneforge.errors import ConfigError, DataError
from tuneforge.objectives.base import TaskData

__all__ = ["load_preference_splits", "preference_reader"]


def preference_reader(run: RunConfig, *, paired: bool | None, margin_key: str | None = None
                      ) -> Callable[[Path], Preferences]:
    """``path -> Preferences`` with the run's data options (format, encoding) and ``task.invalid``."""
    d = run.data

    def read(path: Path) -> Preferences:
        return read_preferences(path, data_format=d.format, encoding=d.encoding, margin_key=margin_key,
                                invalid=run.task.invalid, paired=paired)

    return read


def load_preference_splits(run: RunConfig, read: Callable[[Path], Preferences], notes: list[str]) -> TaskData:
    """Read, sample and carve the splits; ``notes`` gets what was skipped, sampled and carved."""
    d = run.data
    if d.train is None:
        raise ConfigError("a training file of preference pairs is required (e.g. data.train=pairs.jsonl)",
                          key="data.train")
    rng = lambda: np.random.default_rng(run.train.seed)  # noqa: E731
    train = read(d.train)
    if note := train.skipped_note():
        notes.append(f"{d.train}: {note}")
    if d.max_train_samples and d.max_train_samples < len(train):
        train = train.subset(sorted(rng().choice(len(train), d.max_train_samples, replace=False).tolist()))
        notes.append(f"train: a seeded random sample of {d.max_train_samples} examples of {d.train}")
    if d.validation is not None:
        val = read(d.validation)
        if note := val.skipped_note():
            notes.append(f"{d.validation}: {note}")
    else:
        if len(train) < 2:
            raise DataError("need at least 2 examples to hold out a validation split; give data.validation", d.train)
        n_val = max(1, round(d.validation_split * len(train)))
        perm = rng().permutation(len(train))
        train, val = train.subset(sorted(perm[n_val:].tolist())), train.subset(sorted(perm[:n_val].tolist()))
        notes.append(f"validation: {len(val)} of {len(train) + len(val)} examples carved from {d.train} "
                     f"(seeded, seed {run.train.seed})")
    if d.max_eval_samples and d.max_eval_samples < len(val):
        val = val.subset(sorted(rng().choice(len(val), d.max_eval_samples, replace=False).tolist()))
    splits: dict[str, Any] = {"train": train, "validation": val}
    if d.test is not None:
        splits["test"] = read(d.test)
    for name, prefs in splits.items():
        prefs.split = name
    info = {"examples": {k: len(v) for k, v in splits.items()}}
    return TaskData(splits=splits, info=info, notes=notes)
