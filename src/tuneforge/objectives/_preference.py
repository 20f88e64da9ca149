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

from tuneforge.config.schema import RunConfig
from tuneforge.data.preference import Preferences, read_preferences
from tuneforge.data.splits import train_validation
from tuneforge.errors import ConfigError
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
    train = read(d.train)
    if note := train.skipped_note():
        notes.append(f"{d.train}: {note}")

    def read_validation() -> Preferences:
        val = read(d.validation)
        if note := val.skipped_note():
            notes.append(f"{d.validation}: {note}")
        return val

    train, val, split_notes = train_validation(train, read_validation, d, run.train.seed, what="pairs")
    notes.extend(split_notes)
    splits: dict[str, Any] = {"train": train, "validation": val}
    if d.test is not None:
        splits["test"] = read(d.test)
    for name, prefs in splits.items():
        prefs.split = name
    info = {"examples": {k: len(v) for k, v in splits.items()}}
    return TaskData(splits=splits, info=info, notes=notes)
