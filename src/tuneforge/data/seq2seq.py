"""Source -> target examples for ``task: seq2seq``: reading, validation, tokenization and batching.

Two layouts, both validated before any model loads:

* a table (csv, tsv, json, jsonl, parquet; gzip read transparently) with a source and a target column
  (``task.source_column`` / ``task.target_column``, ``source`` / ``target`` by default). A cell may be a
  string or a list of strings: a list source is joined with spaces (SciTLDR stores abstracts as sentence
  lists); a list target holds several references (SciTLDR's dev set has several per abstract).
* two line-aligned text files, ``{source: train.de.gz, target: train.en.gz}`` (`config.schema.TextPair`),
  one example a line (Multi30k's layout).

An empty source or target, or files of different lengths, is a `DataError` naming file:line.

Training uses every reference of a source as its own example; evaluation scores the loss on the first
reference and BLEU/ROUGE against all of them.

Batches pad sources and targets separately (a target may be longer than its source), labels with -100
so padding never counts in the loss: the "constant output" bug of seq2seq fine-tuning comes from padding
labels with the pad id, which the model then learns to emit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.data.batching import plan_batches
from tuneforge.data.readers import column_values, read_lines, read_table, resolve_column
from tuneforge.errors import DataError

__all__ = ["Seq2SeqBatches", "Seq2SeqRecords", "encode_pairs", "read_pairs"]

IGNORE_INDEX = -100


@dataclass
class Seq2SeqRecords:
    """Sources with one or more reference targets each; ``lines[i]`` is where example ``i`` starts."""

    sources: list[str]
    targets: list[list[str]]
    origin: str
    lines: list[int] = field(default_factory=list)
    split: str = ""

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, indices: Sequence[int]) -> Seq2SeqRecords:
        return Seq2SeqRecords([self.sources[i] for i in indices], [self.targets[i] for i in indices], self.origin,
                              [self.lines[i] for i in indices] if self.lines else [], self.split)

    @property
    def references(self) -> int:
        return sum(len(t) for t in self.targets)


def _text(value: Any, path: Path, line: int, role: str, *, many: bool) -> list[str]:
    """A cell as a list of non-empty strings (one for a source, one or more references for a target). Blank
    items of a list are skipped (SciTLDR has a blank sentence); a cell with no text left is an error."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, str):
            raise DataError(f"{role} must be text or a list of texts, got {type(item).__name__}", path, line)
        if item.strip():
            out.append(" ".join(item.split()))
    if not out:
        raise DataError(f"empty {role}", path, line)
    return out if many else [" ".join(out)]


def _read_text_pair(source: Path, target: Path, encoding: str) -> Seq2SeqRecords:
    src, tgt = read_lines(source, encoding), read_lines(target, encoding)
    if len(src) != len(tgt):
        short, long_ = (source, target) if len(src) < len(tgt) else (target, source)
        raise DataError(f"has more lines ({max(len(src), len(tgt))}) than the line-aligned {short} "
                        f"({min(len(src), len(tgt))}); source and target files must have one example per line each",
                        long_, min(len(src), len(tgt)) + 1)
    for path, lines in ((source, src), (target, tgt)):
        for i, line in enumerate(lines):
            if not line.strip():
                raise DataError(f"empty {'source' if path is source else 'target'} line", path, i + 1)
    return Seq2SeqRecords([s.strip() for s in src], [[t.strip()] for t in tgt], f"{source} -> {target}",
                          list(range(1, len(src) + 1)))


def read_pairs(spec: Any, *, source_column: str | int, target_column: str | int, fmt: str | None = None,
               encoding: str = "utf-8", **table_options: Any) -> Seq2SeqRecords:
    """Read one split: a `TextPair` (``.source`` / ``.target`` files) or a table file (see module docstring)."""
    if hasattr(spec, "source") and hasattr(spec, "target"):
        return _read_text_pair(Path(spec.source), Path(spec.target), encoding)
    path = Path(spec)
    table = read_table(path, fmt, encoding=encoding, **table_options)
    if table.columns == ["text"] and source_column != "text":
        raise DataError("a plain text file has no source and target columns; give a table with "
                        f"'{source_column}' and '{target_column}' columns or data.train: {{source: FILE, target: FILE}}",
                        path)
    src_col = resolve_column(table, source_column, "task.source_column")
    tgt_col = resolve_column(table, target_column, "task.target_column")
    raw_src = column_values(table, src_col, role="source column")
    raw_tgt = column_values(table, tgt_col, role="target column")
    sources, targets = [], []
    for s, t, line in zip(raw_src, raw_tgt, table.lines, strict=True):
        sources.append(_text(s, path, line, "source", many=False)[0])
        targets.append(_text(t, path, line, "target", many=True))
    return Seq2SeqRecords(sources, targets, str(path), list(table.lines))


def decoder_ids(tokenizer: Any, model_config: Any) -> tuple[int, int]:
    """(decoder start token, pad token) of an encoder-decoder: from the model config, else the tokenizer."""
    start = getattr(model_config, "decoder_start_token_id", None)
    pad = getattr(model_config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    if start is None:
        start = pad
    return int(start), int(pad)


def encode_pairs(tokenizer: Any, records: Seq2SeqRecords, *, prefix: str, max_source: int, max_target: int,
                 decoder_start: int, every_reference: bool) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """Token ids of sources (``input_ids``) and targets (``labels``), truncated at the end.

    ``every_reference``: one example per reference (training); else the first reference only. A leading
    target token equal to the decoder start token is dropped: the decoder is fed it, never asked to
    predict it (BERT2BERT targets start with [CLS], which is also its decoder start).
    """
    sources, targets = [], []
    for src, refs in zip(records.sources, records.targets, strict=True):
        for ref in refs if every_reference else refs[:1]:
            sources.append(prefix + src)
            targets.append(ref)
    src_ids = tokenizer(sources, verbose=False)["input_ids"] if sources else []
    tgt_ids = tokenizer(text_target=targets, verbose=False)["input_ids"] if targets else []
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    labels = [ids[1:] if ids and ids[0] == decoder_start else ids for ids in tgt_ids]
    stats = {"examples": len(sources), "sources_truncated": sum(len(ids) > max_source for ids in src_ids),
             "targets_truncated": sum(len(ids) > max_target for ids in labels)}
    return ({"input_ids": [_cut(ids, max_source, end) for ids in src_ids],
             "labels": [_cut(ids, max_target, end) for ids in labels]}, stats)


def _cut(ids: list[int], limit: int, end: int | None) -> list[int]:
    """The first ``limit`` ids, keeping a final end-of-sequence token at the end."""
    if len(ids) <= limit:
        return ids
    return ids[: limit - 1] + ids[-1:] if end is not None and ids[-1] == end else ids[:limit]


class Seq2SeqBatches:
    """Tokenized pairs; sources and labels padded each to their own longest row (see module docstring).

    Training batches are grouped by source + target length (`data.batching.plan_batches`).
    """

    def __init__(self, columns: dict[str, list[list[int]]], pad_id: int, *, group_by_length: bool = True,
                 records: Seq2SeqRecords | None = None):
        self.input_ids, self.labels = columns["input_ids"], columns["labels"]
        self.records = records  # the texts they were made from: generation metrics read sources and references
        self.pad_id = pad_id
        self.group_by_length = group_by_length
        self.source_lengths = np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))
        self.target_lengths = np.fromiter((len(x) for x in self.labels), dtype=np.int64, count=len(self.labels))
        self.lengths = self.source_lengths + self.target_lengths

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]:
        return plan_batches(self.lengths, len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                            group_by_length=self.group_by_length)

    @staticmethod
    def _pad(rows: list[list[int]], value: int) -> np.ndarray:
        width = max(1, max(len(r) for r in rows))
        arr = np.full((len(rows), width), value, dtype=np.int64)
        for i, row in enumerate(rows):
            arr[i, : len(row)] = row
        return arr

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        src = [self.input_ids[i] for i in indices]
        inputs = self._pad(src, self.pad_id)
        mask = (np.arange(inputs.shape[1])[None, :] < np.array([len(s) for s in src])[:, None]).astype(np.int64)
        return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(self._pad([self.labels[i] for i in indices], IGNORE_INDEX))}
