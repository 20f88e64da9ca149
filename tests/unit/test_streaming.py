"""Pretraining corpora: shards, globs and gzip; document offsets and line-numbered errors; streamed blocks
identical to in-memory ones; the lazy window plan; and a streaming run resumed mid-stream that sees the
same batches and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tuneforge.config import load_config
from tuneforge.data import streaming
from tuneforge.data.streaming import (
    PackedBlocks,
    WindowPlan,
    corpus_files,
    iter_documents,
    load_corpus_splits,
    scan_corpus,
)
from tuneforge.errors import ConfigError, DataError
from tuneforge.models import resolve_model
from tuneforge.objectives.mlm import MLMObjective
from tuneforge.pipeline import train

LINES = (Path(__file__).resolve().parents[2] / "src" / "tuneforge" / "assets" / "tiny_corpus.txt").read_text(
    encoding="utf-8").splitlines()


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """Three shards of the tiny corpus: txt with blank lines, jsonl, gzip-compressed jsonl."""
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(LINES[:100]) + "\n", encoding="utf-8")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(LINES[100:200])))
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in LINES[200:])
    (d / "notes.md").write_text("not a corpus file")
    return d


def _scan(spec, key="data.train"):
    return scan_corpus(spec, fmt=None, text_column="text", encoding="utf-8", key=key)


def test_folder_glob_and_file_specs(shards: Path) -> None:
    assert [p.name for p in corpus_files(shards, "data.train")] == ["a.txt", "b.jsonl", "c.jsonl.gz"]
    assert [p.name for p in corpus_files(str(shards / "*.jsonl*"), "data.train")] == ["b.jsonl", "c.jsonl.gz"]
    with pytest.raises(ConfigError, match="matches no files") as info:
        corpus_files(str(shards / "*.parquet"), "data.train")
    assert info.value.key == "data.train"
    with pytest.raises(DataError, match="file not found"):
        corpus_files(shards / "missing.txt", "data.train")


def test_documents_offsets_and_lines(shards: Path) -> None:
    docs = list(iter_documents(shards / "a.txt", "txt"))
    assert [d[2] for d in docs] == LINES[:100] and [d[1] for d in docs[:3]] == [1, 3, 5]  # blank lines skipped
    raw = (shards / "a.txt").read_bytes()
    assert all(raw[o:].split(b"\n", 1)[0].decode() == t for o, _, t in docs)
    corpus = _scan(shards)
    assert len(corpus) == len(LINES)
    assert corpus.texts(95, 105) == LINES[95:105] and corpus.texts(299, 310) == LINES[299:310]


@pytest.mark.parametrize(("content", "line", "needle"), [
    ('{"text": "ok"}\n{"text": "broken\n', 2, "invalid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', 3, "'text' field (data.text_column)"),
    ('{"text": 3}\n', 1, "field 'text' is int"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, content: str, line: int, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        _scan(path)
    assert (info.value.path, info.value.line) == (str(path), line)


def test_only_text_formats_and_enough_documents(tmp_path: Path) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match="pretraining reads txt or jsonl"):
        _scan(csv)
    one = tmp_path / "one.txt"
    one.write_text("a single document\n")
    run = load_config(None, ["task=mlm", "model=tiny-bert", f"data.train={one}"])
    with pytest.raises(DataError, match="cannot carve a validation split"):
        load_corpus_splits(run)


def test_validation_is_the_last_documents(shards: Path) -> None:
    run = load_config(None, ["task=mlm", "model=tiny-bert", f"data.train={shards}", "data.validation_split=0.1"])
    data = load_corpus_splits(run)
    assert len(data.splits["train"]) == 279 and len(data.splits["validation"]) == 31
    assert data.splits["validation"].texts(0, 31) == LINES[-31:]


@pytest.mark.parametrize("separator", [None, 7])
def test_streamed_blocks_equal_in_memory_blocks(shards: Path, separator: int | None) -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))
    corpus = _scan(shards)
    kw = {"transform": lambda b, g: {"input_ids": torch.from_numpy(b)}, "separator": separator}
    memory = PackedBlocks(corpus, tok, 16, **kw)
    stream = PackedBlocks(corpus, tok, 16, streaming=True, window=3, **kw)
    assert len(memory) == len(stream) > 300 and memory.total_tokens == stream.total_tokens
    order = np.random.default_rng(0).permutation(len(stream))  # random access across windows and shards
    np.testing.assert_array_equal(stream.blocks(order), memory.blocks(order))
    expected = [t for x in tok(LINES, verbose=False).input_ids for t in (x if separator is None else [*x, separator])]
    np.testing.assert_array_equal(memory.blocks(range(len(memory))).reshape(-1), expected[: len(memory) * 16])


@pytest.mark.parametrize("shuffle", [True, False])
def test_window_plan_covers_every_block_once(shuffle: bool) -> None:
    plan = WindowPlan(103, 10, 8, seed=1, epoch=0, shuffle=shuffle)
    flat = [i for batch in plan for i in batch]
    assert len(plan) == 13 and sorted(flat) == list(range(103))
    assert plan[3:5] == [plan[3], plan[4]] and plan[-1] == plan[12]
    same = WindowPlan(103, 10, 8, seed=1, epoch=0, shuffle=shuffle)
    other = WindowPlan(103, 10, 8, seed=1, epoch=1, shuffle=shuffle)
    assert list(same) == list(plan)
    assert (list(other) != list(plan)) == shuffle and (flat == list(range(103))) != shuffle
    if shuffle:  # the blocks of a window are consecutive in the plan: each window is read once per epoch
        windows = [i // 10 for i in flat]
        assert sum(a != b for a, b in itertools.pairwise(windows)) == 10 and windows != sorted(windows)


def test_streaming_resume_mid_stream_is_exact(tmp_path: Path, shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "WINDOW", 4)  # many windows: resuming has to seek into the middle
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    real_loss = MLMObjective.loss

    def recording_loss(self, model, batch):
        seen.append((len(seen), batch["input_ids"].clone(), batch["labels"].clone()))
        return real_loss(self, model, batch)

    monkeypatch.setattr(MLMObjective, "loss", recording_loss)
    overrides = ["task=mlm", "model=tiny-bert", f"data.train={shards}", "data.streaming=true", "data.max_length=32",
                 "train.batch_size=8", "train.max_steps=30", "train.save_steps=10", "train.save_total_limit=5",
                 "train.eval_steps=10", "train.precision=fp32", "train.tensorboard=false", "train.epochs=1",
                 "train.load_best_at_end=false"]
    full = train(load_config(None, [*overrides, f"output_dir={tmp_path / 'full'}"]), quiet=True)
    assert full.metrics["train"]["epochs"] > 1  # the stream wrapped around into a second epoch
    full_batches = list(seen)

    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-00000030")
    shutil.rmtree(part / "checkpoints" / "step-00000020")
    seen.clear()
    torch.manual_seed(12345)  # whatever the RNG was, the checkpoint restores it
    train(load_config(None, [*overrides, f"output_dir={part}"]), resume=True, quiet=True)
    assert len(seen) == 20
    for (_, a_ids, a_lab), (_, b_ids, b_lab) in zip(full_batches[10:], seen, strict=True):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_lab, b_lab)
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
