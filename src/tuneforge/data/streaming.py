"""Pretraining corpora: documents from txt/jsonl files (or shards), tokenized and packed into fixed blocks.

A document is a non-blank line of a ``.txt`` file or the text field (``data.text_column``) of a ``.jsonl``
record; files may be gzip-compressed, and ``data.train`` may be one file, a folder of shards or a glob.
Documents are tokenized, concatenated (with an optional separator token) and cut into blocks of
``data.max_length`` tokens; the ragged tail is dropped (as in BERT/RoBERTa pretraining and transformers'
``run_mlm.py`` ``group_texts``). Every block is full, so batches need no padding.

Two ways to hold the blocks, behind the same `Batches` interface the engine iterates:

* in memory (default): one flat token array, fully shuffled each epoch;
* streaming (``data.streaming: true``): for corpora larger than memory. A first pass records each
  document's byte offset and token count (cached by fingerprint), about 24 bytes per document. Block ``k``
  covers tokens ``[k*L, (k+1)*L)`` of the concatenated stream, so it is found by a binary search, a seek
  and re-tokenizing the few documents around it. Epochs shuffle windows of ``window`` consecutive blocks
  and the blocks inside each window (a shuffle buffer with random window order); a window is read and
  tokenized once when a batch first needs it. The plan is a lazy sequence, a pure function of
  (seed, epoch), so the engine resumes mid-stream exactly as it does in memory: it rebuilds the plan,
  skips the finished batches, and the first batch seeks straight to its window. No engine change.

Why not ``datasets``: its streaming ``IterableDataset`` resumes by replaying the stream (or by
framework-specific state dicts), and its map cache hashes the whole text; a flat token array plus
offsets is simpler to make exact and costs nothing to load. Gzip shards work but can only seek forward
cheaply: a window behind the current position decompresses the shard from its start again.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from tuneforge.data.batching import plan_batches
from tuneforge.data.readers import detect_format
from tuneforge.data.tokenize import cache_root
from tuneforge.errors import ConfigError, DataError

__all__ = ["TEXT_FORMATS", "Corpus", "PackedBlocks", "corpus_files", "eval_batch", "iter_documents",
           "load_corpus_splits", "scan_corpus"]

TEXT_FORMATS = ("txt", "jsonl")
Transform = Callable[[np.ndarray, "torch.Generator | None"], dict[str, torch.Tensor]]
_CHUNK = 1000  # documents per tokenizer call
WINDOW = 1024  # blocks per streaming window (the shuffle buffer): 1024 x 512 tokens = 4 MB of int64


def corpus_files(spec: str | Path, key: str) -> list[Path]:
    """The files named by ``spec``: a file, a folder (its .txt/.jsonl files, sorted) or a glob pattern."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and _is_text_file(p))
        if not found:
            raise DataError("folder holds no .txt or .jsonl files (optionally .gz)", path)
        return found
    if any(c in str(spec) for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not found:
            raise ConfigError(f"the pattern '{spec}' matches no files", key=key)
        return found
    raise DataError("file not found", path)


def _is_text_file(path: Path) -> bool:
    try:
        return detect_format(path) in TEXT_FORMATS
    except DataError:
        return False


def _open(path: Path) -> IO[bytes]:
    with path.open("rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else path.open("rb")


def _doc_text(raw: bytes, fmt: str, column: str, encoding: str, path: Path, line: int) -> str | None:
    """The document text of one line (None for a blank one); `DataError` names the file and line."""
    try:
        text = raw.decode(encoding).removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid {encoding} text ({e.reason})", path, line) from None
    if not text.strip():
        return None
    if fmt == "txt":
        return text.removeprefix("\ufeff") if line == 1 else text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, line) from None
    if not isinstance(record, dict) or column not in record:
        raise DataError(f"expected a JSON object with a {column!r} field (data.text_column)", path, line)
    value = record[column]
    if not isinstance(value, str):
        raise DataError(f"field {column!r} is {type(value).__name__}, expected a string", path, line)
    return value if value.strip() else None


def iter_documents(path: Path, fmt: str, *, text_column: str = "text", encoding: str = "utf-8",
                   ) -> Iterator[tuple[int, int, str]]:
    """Yield ``(byte offset, 1-based line, text)`` for each document of one file, in order."""
    offset = 0
    with _open(path) as f:
        for line, raw in enumerate(f, start=1):
            text = _doc_text(raw, fmt, text_column, encoding, path, line)
            if text is not None:
                yield offset, line, text
            offset += len(raw)


@dataclass(eq=False)
class Corpus:
    """The documents of one split: where each starts (file, byte offset, line). No text is kept."""

    files: list[Path]
    formats: list[str]
    text_column: str
    encoding: str
    file_id: np.ndarray
    offset: np.ndarray
    line: np.ndarray
    max_blocks: int | None = None  # data.max_train_samples / max_eval_samples, counted in blocks
    _handles: dict[int, IO[bytes]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def source(self) -> str:
        return str(self.files[0]) + (f" (+{len(self.files) - 1} files)" if len(self.files) > 1 else "")

    def subset(self, start: int, stop: int) -> Corpus:
        return Corpus(self.files, self.formats, self.text_column, self.encoding, self.file_id[start:stop],
                      self.offset[start:stop], self.line[start:stop])

    def texts(self, start: int, stop: int) -> list[str]:
        """Texts of documents ``start..stop-1`` (one seek per document, handles kept open)."""
        out = []
        for d in range(start, stop):
            fid = int(self.file_id[d])
            fh = self._handles.get(fid) or self._handles.setdefault(fid, _open(self.files[fid]))
            fh.seek(int(self.offset[d]))
            path, line = self.files[fid], int(self.line[d])
            text = _doc_text(fh.readline(), self.formats[fid], self.text_column, self.encoding, path, line)
            if text is None:
                raise DataError("the file changed since it was indexed (a document is gone)", path, line)
            out.append(text)
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.text_column, self.encoding, *(
            (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files)]).encode())
        for arr in (self.file_id, self.offset):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:32]


def scan_corpus(spec: str | Path, *, fmt: str | None, text_column: Any, encoding: str, key: str) -> Corpus:
    """The cheap first pass: validate every document and record where it starts."""
    files = corpus_files(spec, key)
    if not isinstance(text_column, str):
        raise ConfigError("pretraining reads jsonl fields by name, e.g. data.text_column=text",
                          key="data.text_column")
    formats = []
    for p in files:
        name = detect_format(p, fmt)
        if name not in TEXT_FORMATS:
            raise DataError(f"pretraining reads {' or '.join(TEXT_FORMATS)} (one document per line or record), "
                            f"not {name}", p)
        formats.append(name)
    fids, offsets, lines = array("i"), array("q"), array("q")
    for fid, (p, name) in enumerate(zip(files, formats, strict=True)):
        for offset, line, _ in iter_documents(p, name, text_column=text_column, encoding=encoding):
            fids.append(fid)
            offsets.append(offset)
            lines.append(line)
    if not offsets:
        raise DataError("no documents (every line is blank)", files[0])
    return Corpus(files, formats, text_column, encoding, np.frombuffer(fids, np.int32),
                  np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int64))


def load_corpus_splits(run: Any) -> Any:
    """`TaskData` for the pretraining objectives: train, validation (given or the last documents of train),
    optional test, each a `Corpus`."""
    from tuneforge.objectives.base import TaskData

    d = run.data
    if d.train is None:
        raise ConfigError("a training corpus is required (e.g. data.train=corpus.txt)", key="data.train")
    kw = {"fmt": d.format, "text_column": d.text_column, "encoding": d.encoding}
    train = scan_corpus(d.train, key="data.train", **kw)
    notes = []
    if d.validation is not None:
        val = scan_corpus(d.validation, key="data.validation", **kw)
    else:
        n_val = max(1, round(len(train) * d.validation_split))
        if len(train) < 2:
            raise DataError("one document only: cannot carve a validation split; give data.validation", train.source)
        train, val = train.subset(0, len(train) - n_val), train.subset(len(train) - n_val, len(train))
        notes.append(f"validation: the last {n_val} of {len(train) + n_val} documents of {d.train}")
    train.max_blocks, val.max_blocks = d.max_train_samples, d.max_eval_samples
    for what, n in (("train", d.max_train_samples), ("validation", d.max_eval_samples)):
        if n:
            notes.append(f"{what}: at most the first {n} blocks of {d.max_length} tokens")
    splits = {"train": train, "validation": val}
    if d.test is not None:
        splits["test"] = scan_corpus(d.test, key="data.test", **kw)
    info = {"documents": {k: len(v) for k, v in splits.items()}, "streaming": d.streaming}
    return TaskData(splits=splits, info=info, notes=notes)


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool, separator: int | None) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)["input_ids"]
    return [[*x, separator] for x in ids] if separator is not None else ids


class PackedBlocks:
    """`Batches` of fixed-length token blocks from a `Corpus`, in memory or streamed (module docstring).

    ``transform(blocks [k, L] int64, generator)`` turns blocks into the model's batch (masking, span
    corruption, ...); ``generator=None`` means the global torch RNG, which checkpoints save and restore.
    """

    def __init__(self, corpus: Corpus, tokenizer: Any, block_size: int, *, transform: Transform,
                 streaming: bool = False, add_special_tokens: bool = True, separator: int | None = None,
                 max_blocks: int | None = None, window: int | None = None):
        self.corpus, self.tokenizer, self.block_size = corpus, tokenizer, block_size
        self.transform, self.streaming, self.window = transform, streaming, window or WINDOW
        self._enc = (add_special_tokens, separator)
        backend = tokenizer.backend_tokenizer.to_str()  # the whole pipeline: vocab, normalizer, post-processor
        key = hashlib.sha256(json.dumps([backend, add_special_tokens, separator, corpus.fingerprint()]).encode())
        key = key.hexdigest()[:32]
        self._cache = cache_root() / "corpus" / key
        self._tokens: np.ndarray | None = None
        if streaming:
            counts = self._load_or_count()
            self._cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
            total = int(self._cum[-1])
        else:
            self._tokens = self._load_or_tokenize()
            total = len(self._tokens)
        self.num_blocks = total // block_size
        if max_blocks is not None:
            self.num_blocks = min(self.num_blocks, max_blocks)
        if self.num_blocks == 0:
            raise DataError(f"{total} tokens are fewer than one block of data.max_length={block_size}; "
                            "give more text or lower data.max_length", corpus.source)
        self.total_tokens = total
        self._windows: OrderedDict[int, np.ndarray] = OrderedDict()

    # ------------------------------------------------------------------ tokenization (cached)
    def _chunks(self) -> Iterator[list[list[int]]]:
        for start in range(0, len(self.corpus), _CHUNK):
            texts = self.corpus.texts(start, min(start + _CHUNK, len(self.corpus)))
            yield _encode(self.tokenizer, texts, *self._enc)

    def _load_or_count(self) -> np.ndarray:
        path = self._cache.with_suffix(".counts.npy")
        if path.is_file():
            return np.load(path)
        counts = np.fromiter((len(x) for chunk in self._chunks() for x in chunk), np.int64, len(self.corpus))
        _save(path, counts)
        return counts

    def _load_or_tokenize(self) -> np.ndarray:
        path = self._cache.with_suffix(".tokens.npy")
        if path.is_file():
            return np.load(path)
        tokens = np.concatenate([np.asarray(x, dtype=np.int32) for chunk in self._chunks() for x in chunk])
        _save(path, tokens)
        return tokens

    # ------------------------------------------------------------------ Batches
    def __len__(self) -> int:
        return self.num_blocks

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> Sequence[list[int]]:
        if not self.streaming:
            return plan_batches(None, self.num_blocks, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                group_by_length=False)
        return WindowPlan(self.num_blocks, self.window, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.transform(self.blocks(indices), None)

    def blocks(self, indices: Sequence[int]) -> np.ndarray:
        """Token ids of blocks ``indices`` as an int64 array [len(indices), block_size]."""
        idx = np.asarray(indices, dtype=np.int64)
        L = self.block_size
        if self._tokens is not None:
            return self._tokens[: self.num_blocks * L].reshape(-1, L)[idx].astype(np.int64)
        out = np.empty((len(idx), L), dtype=np.int64)
        for row, k in enumerate(idx.tolist()):
            w, i = divmod(k, self.window)
            out[row] = self._window(w)[i]
        return out

    def _window(self, w: int) -> np.ndarray:
        if w in self._windows:
            self._windows.move_to_end(w)
            return self._windows[w]
        L = self.block_size
        b0, b1 = w * self.window, min((w + 1) * self.window, self.num_blocks)
        t0, t1 = b0 * L, b1 * L
        d0 = int(np.searchsorted(self._cum, t0, side="right")) - 1
        d1 = int(np.searchsorted(self._cum, t1, side="left"))
        enc = _encode(self.tokenizer, self.corpus.texts(d0, d1), *self._enc)
        ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in enc])
        if len(ids) != self._cum[d1] - self._cum[d0]:
            raise DataError("the corpus changed since it was indexed (token counts differ)", self.corpus.source)
        start = t0 - int(self._cum[d0])
        block = ids[start : start + t1 - t0].reshape(b1 - b0, L)
        self._windows[w] = block
        while len(self._windows) > 2:  # a batch spans at most two windows
            self._windows.popitem(last=False)
        return block


class WindowPlan(Sequence):
    """A lazy epoch plan over ``n`` blocks: batches of ``batch_size`` positions, windows shuffled and
    blocks shuffled inside each window; O(number of windows) memory however long the corpus."""

    def __init__(self, n: int, window: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool):
        self.n, self.window, self.batch_size, self.shuffle = n, window, batch_size, shuffle
        self.seed, self.epoch = seed, epoch
        n_windows = math.ceil(n / window)
        rng = np.random.default_rng([seed, epoch])
        self.order = rng.permutation(n_windows) if shuffle else np.arange(n_windows)
        # sizes of windows in plan order, and where each starts in the epoch's flat order
        sizes = np.minimum(window, n - self.order * window)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _position(self, p: int) -> int:
        slot = int(np.searchsorted(self.starts, p, side="right")) - 1
        w = int(self.order[slot])
        i = p - int(self.starts[slot])
        if not self.shuffle:
            return w * self.window + i
        if self._perm is None or self._perm[0] != w:
            size = int(self.starts[slot + 1] - self.starts[slot])
            self._perm = (w, np.random.default_rng([self.seed, self.epoch, w]).permutation(size))
        return w * self.window + int(self._perm[1][i])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo = i * self.batch_size
        return [self._position(p) for p in range(lo, min(lo + self.batch_size, self.n))]


def eval_batch(data: PackedBlocks, indices: Sequence[int], seed: int) -> dict[str, torch.Tensor]:
    """A batch whose randomness (masks, spans) is a function of (seed, block index) only: evaluation numbers
    do not depend on the batch size and never touch the global RNG that training draws from."""
    blocks = data.blocks(indices)
    rows = [data.transform(blocks[j : j + 1], torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
            for j, i in enumerate(indices)]
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def _save(path: Path, array_: np.ndarray) -> None:
    """Write a cache file atomically (np.save to a temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{np.random.default_rng().integers(1 << 32)}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array_)
    tmp.replace(path)
