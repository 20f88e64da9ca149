"""Batch plans and collation: what the engine iterates over.

A `Batches` source knows how many examples it has, how to plan an epoch (a list of index lists) and how
to collate indices into tensors. Plans are pure functions of (seed, epoch), which is what makes resume
exact: a resumed run rebuilds the same plan and skips the batches already done.

Padding is dynamic (to the longest row of each batch, never to ``max_length``) and training batches are
grouped by length: shuffle, cut into chunks of ``group_size`` batches, sort each chunk by length, cut into
batches, shuffle the batches. On short-sentence data this removes most padding, the usual 2-10x loss on
CPU, while keeping batches random enough for SGD (the HF Trainer's ``group_by_length`` does the same with
its "megabatches").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["Batches", "TensorBatches", "TokenBatches", "num_batches", "plan_batches"]


class Batches(Protocol):
    """What the engine needs from a data split."""

    def __len__(self) -> int: ...

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]: ...

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...


def num_batches(data: Any, batch_size: int) -> int:
    """Batches in one epoch of ``data``: ``ceil(len / batch_size)``, or the source's own count when it plans
    batches otherwise (``num_batches(batch_size)``, e.g. multi-task data: one task per batch)."""
    own = getattr(data, "num_batches", None)
    return own(batch_size) if callable(own) else -(-len(data) // batch_size)


def plan_batches(
    lengths: np.ndarray | None,
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    group_by_length: bool,
    group_size: int = 64,
) -> list[list[int]]:
    """Deterministic batch plan for one epoch (see module docstring)."""
    if not shuffle:
        order = np.argsort(lengths, kind="stable") if (lengths is not None and group_by_length) else np.arange(n)
        return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is None or not group_by_length:
        return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    chunk = batch_size * group_size
    batches: list[list[int]] = []
    for start in range(0, n, chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size].tolist() for i in range(0, len(part), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


class TokenBatches:
    """Tokenized examples with dynamic padding.

    Args:
        columns: ``input_ids`` (list of token-id lists) plus any other per-token lists of the same
            lengths (``token_type_ids``, ``labels`` for LM objectives, ``position_ids`` for packing) and
            per-example scalars (``labels`` for classification).
        pad_id: token id used for padding ``input_ids``.
        pad_values: padding value of other per-token columns (default 0; LM ``labels`` use -100, the
            index cross-entropy ignores).
        group_by_length: group training batches by length.
    """

    def __init__(self, columns: dict[str, Sequence[Any]], pad_id: int, *, group_by_length: bool = True,
                 pad_values: dict[str, int] | None = None):
        self.columns = columns
        self.pad_values = {"labels": -100, **(pad_values or {}), "input_ids": pad_id}
        self.pad_id = pad_id
        self.group_by_length = group_by_length
        self.lengths = np.fromiter((len(x) for x in columns["input_ids"]), dtype=np.int64)
        self._ragged = [k for k, v in columns.items() if len(v) and isinstance(v[0], (list, tuple, np.ndarray))]
        self._scalar = [k for k in columns if k not in self._ragged]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]:
        return plan_batches(
            self.lengths, len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
            group_by_length=self.group_by_length,
        )

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        lengths = self.lengths[list(indices)]
        width = int(lengths.max())
        batch: dict[str, torch.Tensor] = {}
        for key in self._ragged:
            arr = np.full((len(indices), width), self.pad_values.get(key, 0), dtype=np.int64)
            col = self.columns[key]
            for row, i in enumerate(indices):
                seq = col[i]
                arr[row, : len(seq)] = seq
            batch[key] = torch.from_numpy(arr)
        if "attention_mask" not in self.columns:
            batch["attention_mask"] = torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.int64))
        for k in self._scalar:
            batch[k] = torch.as_tensor([self.columns[k][i] for i in indices])
        return batch


class TensorBatches:
    """Fixed-size tensors (e.g. cached backbone features) batched by index."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {v.shape[0] for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors disagree on the number of examples: {sizes}")
        self.tensors = tensors
        self._n = sizes.pop()

    def __len__(self) -> int:
        return self._n

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]:
        return plan_batches(None, len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle, group_by_length=False)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}
