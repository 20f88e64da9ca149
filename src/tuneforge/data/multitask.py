"""Batches of several tasks over one shared backbone: which task each batch comes from, and when.

A multi-task epoch is a sequence of single-task batches (one task per batch, so each batch goes through one
head with one loss). How the tasks are interleaved is the sampling strategy:

* ``proportional``: every batch of every task exactly once per epoch, in a seeded random order, so every
  example is seen once (MT-DNN, Liu et al. 2019, samples tasks this way);
* ``temperature``: each batch's task is drawn with ``p_i ∝ n_i^(1/T)`` (``n_i``: training examples of task
  i). ``T = 1`` is proportional in expectation, ``T -> inf`` uniform; ``T`` between lifts small tasks
  without drowning large ones (the mixing of Arivazhagan et al. 2019 and mT5/T5's "temperature-scaled
  mixing", Raffel et al. 2020). A task drawn more often than it has batches starts another pass over its
  own data;
* ``round_robin``: tasks in turn, 0, 1, ..., K-1, 0, 1, ... (small tasks repeat, large ones are cut).

The epoch has as many batches as the tasks have together (``sum_i ceil(n_i / batch_size)``) whatever the
strategy, so the step budget of ``train.epochs`` is the same for all three. The plan is a pure function of
(seed, epoch), which is what keeps resume exact: the loop rebuilds the plan and skips the batches done.
Indices are global (task i's examples are numbered after those of tasks 0..i-1); ``collate`` maps them back
and tags the batch with the task's index under ``"task"``.

Written here because no library offers it: `datasets.interleave_datasets` has probabilities but mixes
examples, not whole batches, and does not know our length-grouped per-task batch plans.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["SAMPLING", "MultiTaskBatches", "task_probabilities", "task_sequence"]

SAMPLING = ("proportional", "temperature", "round_robin")
_CYCLE_SEED = 1_000_003  # a task's k-th pass over its data within one epoch plans with seed + k * this


def task_probabilities(sizes: Sequence[int], sampling: str, temperature: float = 1.0) -> np.ndarray:
    """The share of batches each task gets: ``n_i^(1/T)`` normalised (``temperature``), ``n_i`` normalised
    (``proportional``, in batches it is exact), uniform (``round_robin``)."""
    n = np.asarray(sizes, dtype=np.float64)
    if sampling == "round_robin":
        w = np.ones_like(n)
    elif sampling == "temperature":
        w = n ** (1.0 / temperature)
    elif sampling == "proportional":
        w = n
    else:
        raise ValueError(f"unknown sampling '{sampling}'; allowed: {', '.join(SAMPLING)}")
    return w / w.sum()


def task_sequence(batch_counts: Sequence[int], sizes: Sequence[int], sampling: str, *, temperature: float,
                  seed: int, epoch: int) -> list[int]:
    """The task of each batch of epoch ``epoch`` (length ``sum(batch_counts)``); see module docstring."""
    total = int(sum(batch_counts))
    if sampling == "round_robin":
        return [i % len(batch_counts) for i in range(total)]
    rng = np.random.default_rng([seed, epoch, 7])
    if sampling == "proportional":
        seq = np.repeat(np.arange(len(batch_counts)), batch_counts)
        return rng.permutation(seq).tolist()
    p = task_probabilities(sizes, sampling, temperature)
    return rng.choice(len(batch_counts), size=total, p=p).tolist()


class MultiTaskBatches:
    """Several tasks' `Batches` as one source the engine iterates (see module docstring).

    Args:
        parts: task name -> that task's batches (the objective's ``prepare`` output), in task order.
        sampling: ``proportional``, ``temperature`` or ``round_robin``.
        temperature: T of ``temperature`` sampling.
    """

    def __init__(self, parts: Mapping[str, Any], sampling: str = "proportional", temperature: float = 2.0):
        if sampling not in SAMPLING:
            raise ValueError(f"unknown sampling '{sampling}'; allowed: {', '.join(SAMPLING)}")
        self.parts = dict(parts)
        self.names = list(self.parts)
        self.sampling, self.temperature = sampling, temperature
        self.sizes = [len(p) for p in self.parts.values()]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch: each task's own count, summed (one task per batch)."""
        return sum(math.ceil(n / batch_size) for n in self.sizes)

    def task_of(self, index: int) -> int:
        return bisect.bisect_right(self.offsets, index) - 1

    def _stream(self, t: int, epoch: int, batch_size: int, seed: int, need: int) -> list[list[int]]:
        """``need`` batches of task ``t`` for one epoch: its own epoch plan, then further seeded passes."""
        part, out, cycle = self.parts[self.names[t]], [], 0
        while len(out) < need:
            out += part.plan(epoch, batch_size, seed=seed + cycle * _CYCLE_SEED, shuffle=True)
            cycle += 1
        return out[:need]

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]:
        """Global-index batches, one task each (in task order without ``shuffle``: evaluation)."""
        counts = [math.ceil(n / batch_size) for n in self.sizes]
        if not shuffle:
            return [[i + self.offsets[t] for i in b] for t, name in enumerate(self.names)
                    for b in self.parts[name].plan(epoch, batch_size, seed=seed, shuffle=False)]
        seq = task_sequence(counts, self.sizes, self.sampling, temperature=self.temperature, seed=seed, epoch=epoch)
        need = np.bincount(seq, minlength=len(self.names)).tolist()
        streams = [iter(self._stream(t, epoch, batch_size, seed, k)) for t, k in enumerate(need)]
        return [[i + self.offsets[t] for i in next(streams[t])] for t in seq]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The task's own collation of the batch plus ``task`` (the task's index, a 0-d tensor)."""
        t = self.task_of(indices[0])
        lo, hi = self.offsets[t], self.offsets[t + 1]
        if any(not lo <= i < hi for i in indices):
            raise ValueError("a multi-task batch mixes tasks; each batch must come from one task")
        batch = self.parts[self.names[t]].collate([i - lo for i in indices])
        batch["task"] = torch.tensor(t)
        return batch
