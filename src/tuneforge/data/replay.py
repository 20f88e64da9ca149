"""Replay: a share of the training batches drawn from general data, interleaved with the domain batches.

Mixing general data back into fine-tuning is the simplest cure for forgetting (LLaMA-Factory's
``interleave_probs``; "rehearsal" in continual learning). Whole batches come from one source, so each
collates with its own padding and the objective sees ordinary batches. An epoch is the domain's own epoch
(every domain batch once) plus ``round(n_domain * ratio / (1 - ratio))`` general batches, so general batches
are ``ratio`` of the steps; where they fall and which general examples they hold are a pure function of
(seed, epoch), so resume is exact. General examples are indexed after the domain's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ReplayBatches", "replay_batches"]

_GENERAL_SEED = 7_919  # general passes plan with seed + this (+ k * _CYCLE for the k-th pass in an epoch)
_CYCLE = 1_000_003


def replay_batches(n_domain: int, ratio: float) -> int:
    """General batches per epoch for ``n_domain`` domain batches so that they are ``ratio`` of all batches."""
    return round(n_domain * ratio / (1.0 - ratio))


class ReplayBatches:
    """Domain batches with general ones interleaved at ``ratio`` of the steps (see module docstring)."""

    def __init__(self, domain: Any, general: Any, ratio: float):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"replay ratio must be between 0 and 1 (exclusive), got {ratio}")
        self.domain, self.general, self.ratio = domain, general, ratio
        self.offset = len(domain)

    def __len__(self) -> int:
        return len(self.domain)

    def num_batches(self, batch_size: int) -> int:
        n = math.ceil(len(self.domain) / batch_size)
        return n + replay_batches(n, self.ratio)

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]:
        domain = self.domain.plan(epoch, batch_size, seed=seed, shuffle=shuffle)
        if not shuffle:
            return domain
        need = replay_batches(len(domain), self.ratio)
        general: list[list[int]] = []
        cycle = 0
        while len(general) < need:
            general += self.general.plan(epoch, batch_size, seed=seed + _GENERAL_SEED + cycle * _CYCLE, shuffle=True)
            cycle += 1
        rng = np.random.default_rng([seed, epoch, 11])
        order = rng.permutation(np.repeat([0, 1], [len(domain), need]))
        d, g = iter(domain), iter(general[:need])
        return [next(d) if src == 0 else [i + self.offset for i in next(g)] for src in order]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        if indices[0] >= self.offset:
            if any(i < self.offset for i in indices):
                raise ValueError("a replay batch mixes domain and general examples")
            return self.general.collate([i - self.offset for i in indices])
        if any(i >= self.offset for i in indices):
            raise ValueError("a replay batch mixes domain and general examples")
        return self.domain.collate(indices)
