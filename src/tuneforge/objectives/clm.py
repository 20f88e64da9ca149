"""Causal language modelling (``task: clm``): continue pretraining a decoder on raw text.

Input is documents: a text column of csv/tsv/json/jsonl/parquet (``data.text_column``), or a .txt file cut
by ``task.txt_unit`` into one document per non-empty ``line``, per blank-line-separated ``paragraph``, or
the whole ``file`` as one stream. Each document is tokenized as the tokenizer encodes text by default
(BOS where the model uses one) and followed by EOS (``task.add_eos``). ``task.packing`` (see
`data.packing`): ``blocks`` concatenates everything and cuts rows of ``data.max_length`` tokens, attention
crossing documents (GPT-2 style); ``documents`` splits long documents into ``max_length`` pieces and packs
whole pieces into rows with attention kept inside each document.

Evaluation reports token-weighted ``loss`` (mean NLL) and ``perplexity = exp(loss)`` on held-out text;
without ``data.validation`` a seeded ``data.validation_split`` share of the documents is held out (a
single-document file is split at a line boundary instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import Batches
from tuneforge.data.packing import chunk, lm_batches, pack_blocks, pack_documents, packed_grouping
from tuneforge.data.readers import column_values, detect_format, read_table, resolve_column
from tuneforge.errors import ConfigError, DataError
from tuneforge.objectives.base import Built, TaskData
from tuneforge.objectives.causal_lm import (
    CausalLMObjective,
    check_decoder,
    load_causal_lm,
    saved_causal_lm,
)
from tuneforge.objectives.configs.clm import ClmConfig

__all__ = ["ClmConfig", "ClmObjective", "Documents", "read_documents"]


@dataclass
class Documents:
    """Texts of one split and the 1-based line where each starts."""

    texts: list[str]
    source: str
    lines: list[int]
    split: str = ""  # "train", "validation", "test" once assigned (for notes)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Documents:
        return Documents([self.texts[i] for i in idx], self.source, [self.lines[i] for i in idx], self.split)


def _join(texts: list[str], lines: list[int]) -> str:
    """Rejoin non-empty lines, restoring the blank lines between them from the line numbers."""
    parts = [texts[0]]
    for i in range(1, len(texts)):
        parts.append("\n" * (lines[i] - lines[i - 1]) + texts[i])
    return "".join(parts)


def read_documents(run: RunConfig, path: Path) -> Documents:
    """Documents of ``path`` as ``data.*`` and ``task.txt_unit`` describe them; bad rows raise `DataError`."""
    d = run.data
    fmt = detect_format(path, d.format)
    table = read_table(path, fmt, header=d.header, quoting=d.quoting, delimiter=d.delimiter, encoding=d.encoding)
    if fmt == "txt":
        texts, lines = [r["text"] for r in table.rows], list(table.lines)
        unit = run.task.txt_unit if isinstance(run.task, ClmConfig) else "line"
        if unit == "file":
            return Documents([_join(texts, lines)], str(path), [lines[0]])
        if unit == "paragraph":
            starts = [0] + [i for i in range(1, len(lines)) if lines[i] != lines[i - 1] + 1] + [len(lines)]
            groups = [range(a, b) for a, b in pairwise(starts)]
            return Documents([_join(texts[g.start:g.stop], lines[g.start:g.stop]) for g in groups], str(path),
                             [lines[g.start] for g in groups])
        return Documents(texts, str(path), lines)
    col = resolve_column(table, d.text_column, "text column")
    values = column_values(table, col, role="text")
    for v, line in zip(values, table.lines, strict=True):
        if not isinstance(v, str):
            raise DataError(f"text column {col!r} holds {type(v).__name__}, expected a string", path, line)
    return Documents(values, str(path), list(table.lines))


def _sample(docs: Documents, k: int | None, seed: int) -> Documents:
    if k is None or k >= len(docs):
        return docs
    return docs.subset(sorted(np.random.default_rng(seed).choice(len(docs), size=k, replace=False).tolist()))


def _carve(docs: Documents, share: float, seed: int) -> tuple[Documents, Documents, str]:
    if len(docs) >= 2:
        n_val = max(1, round(share * len(docs)))
        perm = np.random.default_rng(seed).permutation(len(docs))
        val, train = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
        return docs.subset(train), docs.subset(val), f"{len(val)} of {len(docs)} documents (seeded, seed {seed})"
    text = docs.texts[0]
    cut = text.find("\n", int(len(text) * (1 - share)))
    cut = cut if cut > 0 else int(len(text) * (1 - share))
    if cut <= 0 or cut >= len(text) - 1:
        raise DataError("the text is too short to hold out a validation part; give data.validation", docs.source)
    start = cut + len(text[cut:]) - len(text[cut:].lstrip("\n"))
    line = docs.lines[0] + text.count("\n", 0, start)
    train = Documents([text[:cut].rstrip("\n")], docs.source, docs.lines)
    val = Documents([text[start:]], docs.source, [line])
    return train, val, f"the last {100 * share:.0f}% of the single document (from line {line})"


class ClmObjective(CausalLMObjective):
    """Implements the `Objective` protocol for causal-LM training on raw text."""

    name = "clm"

    def __init__(self, run: RunConfig):
        super().__init__(run)
        self._samples: Documents | None = None

    def load_data(self, run: RunConfig) -> TaskData:
        d = run.data
        if d.train is None:
            raise ConfigError("a training file is required (e.g. data.train=corpus.txt)", key="data.train")
        if run.model.init != "scratch":  # a scratch model's architecture is checked by load_or_build
            check_decoder(run)
        train = read_documents(run, d.train)
        if d.max_train_samples and d.max_train_samples < len(train):
            train = _sample(train, d.max_train_samples, run.train.seed)
            self.notes.append(f"train: a seeded random sample of {d.max_train_samples} documents of {d.train}")
        if d.validation is not None:
            val = read_documents(run, d.validation)
        else:
            train, val, how = _carve(train, d.validation_split, run.train.seed)
            self.notes.append(f"validation: {how} carved from {d.train}")
        val = _sample(val, d.max_eval_samples, run.train.seed)
        splits: dict[str, Any] = {"train": train, "validation": val}
        if d.test is not None:
            splits["test"] = read_documents(run, d.test)
        for name, docs in splits.items():
            docs.split = name
        self._samples = val
        info = {"documents": {k: len(v) for k, v in splits.items()}, "packing": run.task.packing}
        return TaskData(splits=splits, info=info, notes=self.notes)

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        if run.model.init == "scratch":  # model.init=scratch: a random gpt2/llama around model.tokenizer
            from transformers import AutoModelForCausalLM

            from tuneforge.models.scratch import load_or_build

            return load_or_build(run, AutoModelForCausalLM, model_path, architectures=("gpt2", "llama"))
        return load_causal_lm(run, model_path, packed=run.task.packing == "documents")

    def _encode(self, docs: Documents, tokenizer: Any) -> list[list[int]]:
        ids = tokenizer(docs.texts, return_attention_mask=False, verbose=False)["input_ids"]
        eos = tokenizer.eos_token_id
        if self.run.task.add_eos and eos is not None:
            ids = [x if x and x[-1] == eos else [*x, eos] for x in ids]
        return ids

    def prepare(self, records: Documents, tokenizer: Any, run: RunConfig) -> Batches:
        ids = self._encode(records, tokenizer)
        size = run.data.max_length
        if run.task.packing == "blocks":
            cols = pack_blocks(ids, size)
        else:
            pieces = [p for x in ids for p in chunk(x, x, size) if len(p[0]) >= 2]
            cols = pack_documents([p[0] for p in pieces], [p[1] for p in pieces], size)
        n_tokens = sum(len(x) for x in ids)
        note = (f"{records.split or records.source}: {len(records)} documents, {n_tokens:,} tokens -> {len(cols['input_ids'])} rows "
                f"of <= {size} tokens ({run.task.packing})")
        if note not in self.notes:
            self.notes.append(note)
        if not cols["input_ids"]:
            raise DataError("no text left to train on after tokenization", records.source)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return lm_batches(cols, pad, group_by_length=packed_grouping(run.train.group_by_length, run.task.packing))

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the HF folder: the run's config.yaml records how text was read and packed."""

    def from_saved(self, model_dir: Path) -> Built:
        return saved_causal_lm(model_dir)

    def read_split(self, path: Path) -> Documents:
        return read_documents(self.run, path)

    def report_samples(self, model: nn.Module, tokenizer: Any) -> list[dict[str, Any]]:
        """Greedy continuations of the first half (at most 32 tokens) of three held-out documents."""
        from tuneforge.generation import GenerationOptions, generate

        if self._samples is None:
            return []
        # a whole short document as the prompt would be answered by EOS, which is what training teaches
        heads = [tokenizer(t[:2000], add_special_tokens=False)["input_ids"] for t in self._samples.texts[:50]]
        prompts = [tokenizer.decode(h[: min(32, len(h) // 2)]) for h in heads if len(h) >= 12][:3]
        opts = GenerationOptions(max_new_tokens=48, repetition_penalty=1.2)
        return [{"prompt": p, "generation": g} for p, g in zip(prompts, generate(model, tokenizer, prompts, opts), strict=True)]


OBJECTIVE = ClmObjective
