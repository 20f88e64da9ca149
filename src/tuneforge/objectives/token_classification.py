"""Token classification: a tag per word (NER as in CoNLL-2003, POS tagging, chunking as in CoNLL-2000).

The model is the architecture's ``AutoModelForTokenClassification`` head, so a run directory loads in plain
transformers. Data come from `tuneforge.data.conll` (CoNLL column files or JSON/JSONL rows, IOB1/IOB2/BIOES,
all IOB2 inside). The tag set is the training split's tags plus the ``I-`` of every ``B-`` type (so that
continuation sub-tokens always have a label), ``O`` first; it is stored in ``labels.json`` and ``id2label``.

Sub-word alignment (a fast tokenizer, ``is_split_into_words=True`` and ``word_ids()``, as in the Hugging
Face token-classification example): the first sub-token of each word carries its tag and the others -100
(ignored by the loss); ``task.label_all_tokens`` labels every sub-token, with ``B-X`` continued as ``I-X``.
Whatever the labelling, a word is *predicted* from its first sub-token.

A sentence whose sub-tokens do not fit ``data.max_length`` is cut into windows of whole words, never
truncated; the run notes count them, and evaluation re-assembles the per-word predictions of a sentence from
its windows, so every word is scored exactly once. Loss is cross-entropy over the labelled positions;
metrics are seqeval's (`tuneforge.eval.ner`: conlleval-compatible entity F1 as the headline ``f1``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import TokenBatches
from tuneforge.data.conll import TaggedSentences, from_iob2, read_tagged
from tuneforge.data.splits import seeded_carve, seeded_sample
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.ner import ner_metrics
from tuneforge.objectives.base import Built, TaskData, eval_batches
from tuneforge.objectives.configs.token_classification import TokenClassificationConfig
from tuneforge.track.atomic import atomic_write_json

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["TokenClassificationConfig", "TokenClassificationObjective", "WordBatches", "align", "label_set"]


def label_set(tags: Sequence[Sequence[str]]) -> list[str]:
    """``O`` then, per entity type (sorted), ``B-`` and ``I-``: every tag seen plus the ``I-`` of each ``B-``."""
    seen = {t for seq in tags for t in seq}
    seen |= {"I-" + t[2:] for t in seen if t.startswith("B-")}
    return ["O", *sorted(seen - {"O"}, key=lambda t: (t[2:], t[0]))]


def align(word_ids: Sequence[int | None], word_labels: Sequence[int], continuation: Sequence[int],
          label_all_tokens: bool) -> list[int]:
    """Per-token labels from per-word label ids: the first sub-token of a word gets its label, the others
    -100, or ``continuation[label]`` (``B-X`` -> ``I-X``) with ``label_all_tokens``; special tokens -100."""
    out: list[int] = []
    prev: int | None = None
    for w in word_ids:
        if w is None:
            out.append(-100)
        elif w != prev:
            out.append(word_labels[w])
        else:
            out.append(continuation[word_labels[w]] if label_all_tokens else -100)
        prev = w
    return out


@dataclass
class Window:
    """One model row: sentence ``sentence``'s words ``first .. first+n-1``; ``positions[j]`` is the token
    position of the first sub-token of word ``first + j``."""

    sentence: int
    first: int
    positions: list[int]


class WordBatches(TokenBatches):
    """`TokenBatches` of windows plus what re-assembles per-word predictions (``windows``) and the gold tags."""

    def __init__(self, columns: dict[str, Sequence[Any]], pad_id: int, *, windows: list[Window],
                 sentences: TaggedSentences, group_by_length: bool = True):
        super().__init__(columns, pad_id, group_by_length=group_by_length)
        self.windows = windows
        self.sentences = sentences


def _windows(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Cut words of ``lengths`` sub-tokens into (first, end) runs of whole words of at most ``budget``."""
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > budget and i > start:
            out.append((start, i))
            start, used = i, 0
        used += n
    out.append((start, len(lengths)))
    return out


class TokenClassificationObjective:
    """Implements the `Objective` and `PredictiveObjective` protocols for word tagging."""

    name = "token_classification"
    default_metric = "f1"
    greater_is_better = True

    def __init__(self, run: RunConfig):
        self.run = run
        self.labels: list[str] = []
        self.notes: list[str] = []

    # ----------------------------------------------------------------- data
    def _read(self, path: Path, need_tags: bool = True) -> TaggedSentences:
        t, d = self.run.task, self.run.data
        return read_tagged(path, scheme=t.scheme, tag_column=t.tag_column, need_tags=need_tags,
                           fmt=d.format if d.format in ("json", "jsonl") else None, tokens_field=t.tokens_field,
                           tags_field=t.tags_field, encoding=d.encoding)

    def _check_known(self, split: TaggedSentences) -> TaggedSentences:
        known = set(self.labels)
        for seq, lines in zip(split.tags or [], split.tag_lines, strict=True):
            for tag, line in zip(seq, lines, strict=True):
                if tag not in known:
                    raise DataError(f"tag {tag!r} does not occur in the training data (training tags: "
                                    f"{', '.join(self.labels)})", split.source, line)
        return split

    def load_data(self, run: RunConfig) -> TaskData:
        d = run.data
        if d.train is None:
            raise ConfigError("a training file is required (e.g. data.train=eng.train)", key="data.train")
        train = self._read(d.train)
        notes: list[str] = []
        if d.max_train_samples and d.max_train_samples < len(train):
            train = train.subset(seeded_sample(len(train), d.max_train_samples, run.train.seed))
            notes.append(f"train: a seeded random sample of {d.max_train_samples} sentences of {d.train}")
        self.labels = label_set(train.tags)
        if len(self.labels) < 2:
            raise DataError("the training tags are all 'O'; need at least one entity/tag type", d.train)
        if d.validation is not None:
            val = self._check_known(self._read(d.validation))
        else:
            keep, held = seeded_carve(len(train), d.validation_split, run.train.seed)
            if not keep:
                raise DataError("too few sentences to carve a validation split; give data.validation", d.train)
            val, train = train.subset(held), train.subset(keep)
            notes.append(f"validation: {len(val)} sentences carved from {d.train} (seed {run.train.seed})")
        if d.max_eval_samples and d.max_eval_samples < len(val):
            val = val.subset(seeded_sample(len(val), d.max_eval_samples, run.train.seed))
        splits: dict[str, Any] = {"train": train, "validation": val}
        if d.test is not None:
            splits["test"] = self._check_known(self._read(d.test))
        self.notes = notes
        return TaskData(splits=splits, info={"labels": self.labels, "scheme": run.task.scheme}, notes=notes)

    # ----------------------------------------------------------------- model
    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModelForTokenClassification

        tokenizer = _tokenizer(model_path)
        names = data.info["labels"]
        self.labels = names
        model, info = AutoModelForTokenClassification.from_pretrained(
            model_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, attn_implementation=run.model.attn_implementation,
            output_loading_info=True, dtype=torch.float32,
        )
        return Built(model, tokenizer, sorted(info.get("missing_keys", [])))

    def prepare(self, records: TaggedSentences, tokenizer: Any, run: RunConfig) -> WordBatches:
        """Tokenize sentences into windows of whole words (see module docstring), labels aligned per token."""
        ids = {n: i for i, n in enumerate(self.labels)}
        cont = [ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(self.labels)]
        budget = run.data.max_length - tokenizer.num_special_tokens_to_add(pair=False)
        enc = tokenizer(records.tokens, is_split_into_words=True, add_special_tokens=True,
                        return_attention_mask=False, return_token_type_ids=False)
        input_ids: list[list[int]] = []
        labels: list[list[int]] = []
        windows: list[Window] = []
        split_sentences = extra_windows = 0
        for s, words in enumerate(records.tokens):
            word_labels = [ids[t] for t in records.tags[s]] if records.tags is not None else [0] * len(words)
            row_ids, wids = enc["input_ids"][s], enc.word_ids(s)
            if len(row_ids) <= run.data.max_length:
                parts = [((0, len(words)), row_ids, wids)]
            else:
                counts = np.bincount([w for w in wids if w is not None], minlength=len(words)).tolist()
                cuts = _windows(counts, budget)
                sub = tokenizer([words[a:b] for a, b in cuts], is_split_into_words=True, add_special_tokens=True,
                                truncation=True, max_length=run.data.max_length, return_attention_mask=False,
                                return_token_type_ids=False)
                parts = [(c, sub["input_ids"][j], sub.word_ids(j)) for j, c in enumerate(cuts)]
                split_sentences += 1
                extra_windows += len(cuts) - 1
            for (a, b), row, wid in parts:
                lab = align(wid, word_labels[a:b], cont, run.task.label_all_tokens)
                first_pos = {}
                for pos, w in enumerate(wid):
                    if w is not None and w not in first_pos:
                        first_pos[w] = pos
                # a word cut by truncation (one word longer than max_length) keeps its first sub-tokens
                windows.append(Window(s, a, [first_pos[j] for j in range(b - a)]))
                input_ids.append(row)
                labels.append(lab)
        if split_sentences:
            self.notes.append(f"{split_sentences} of {len(records)} sentences of {records.source} exceed "
                              f"data.max_length={run.data.max_length} tokens: split into {extra_windows} extra "
                              f"windows of whole words")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return WordBatches({"input_ids": input_ids, "labels": labels}, pad, windows=windows, sentences=records,
                           group_by_length=run.train.group_by_length)

    # ----------------------------------------------------------------- training
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output, ``.logits`` [B, T, C] aligned with ``input_ids`` (soft-prompt methods prepend
        virtual positions; they are dropped); labels are not passed (the loss is ours)."""
        from transformers.modeling_outputs import TokenClassifierOutput

        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        width = batch["input_ids"].shape[1]
        logits = out.logits
        if logits.shape[1] != width:
            logits = logits[:, -width:]
        return TokenClassifierOutput(logits=logits)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the labelled positions (labels != -100)."""
        logits = outputs.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100)

    def word_scores(self, model: nn.Module, data: WordBatches, *, batch_size: int, runtime: Runtime
                    ) -> tuple[list[np.ndarray], float, int]:
        """Per sentence, the tag probabilities [words, C] read at each word's first sub-token; plus the summed
        loss and the number of labelled positions."""
        probs: list[np.ndarray | None] = [None] * len(data.sentences)
        total, count = 0.0, 0
        for indices, batch in eval_batches(model, data, batch_size, runtime):
            logits = self.forward(model, batch).logits.float()
            labels = batch["labels"]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
            p = torch.softmax(logits, -1).cpu().numpy()
            for row, i in enumerate(indices):
                w = data.windows[i]
                s = w.sentence
                if probs[s] is None:
                    probs[s] = np.full((len(data.sentences.tokens[s]), p.shape[-1]), np.nan, dtype=np.float32)
                probs[s][w.first : w.first + len(w.positions)] = p[row, w.positions]
        for s, pr in enumerate(probs):
            if pr is None or np.isnan(pr).any():
                raise RuntimeError(f"sentence {s}: a word received no prediction (windowing bug)")
        return probs, total, count

    def evaluate(self, model: nn.Module, data: WordBatches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        probs, total, count = self.word_scores(model, data, batch_size=batch_size, runtime=runtime)
        pred = [[self.labels[k] for k in p.argmax(-1)] for p in probs]
        metrics = ner_metrics(data.sentences.tags, pred, entities=self.run.task.scheme != "none")
        metrics["loss"] = total / max(1, count)
        return metrics

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        atomic_write_json(out_dir / "labels.json", {"labels": data.info["labels"], "scheme": data.info["scheme"]})

    # ----------------------------------------------------------------- after training
    def load_state(self, model_dir: Path) -> None:
        """The tag set of a saved tagger (``labels.json``)."""
        self.labels = read_tag_set(model_dir)

    def from_saved(self, model_dir: Path) -> Built:
        """Load a trained tagger folder (plain transformers, or a method's saved form) and its tag set."""
        from transformers import AutoModelForTokenClassification

        from tuneforge.methods.saved import load_trained

        self.load_state(model_dir)
        model = load_trained(AutoModelForTokenClassification, model_dir, dtype=torch.float32)
        return Built(model.eval(), _tokenizer(model_dir))

    def read_split(self, path: Path) -> TaggedSentences:
        """Read an evaluation file; its tags must be in the trained tag set."""
        return self._check_known(self._read(path))

    def read_inputs(self, path: Path) -> tuple[list[str], list[str] | None]:
        """Sentences of a CoNLL or JSON/JSONL input file (tags not needed), words joined by single spaces."""
        return [" ".join(words) for words in self._read(path, need_tags=False).tokens], None

    def predict(self, built: Built, texts: list[str], pairs: list[str] | None, *, batch_size: int,
                runtime: Runtime) -> list[dict[str, Any]]:
        """Per text (words split on whitespace): ``tags`` per word in the run's scheme and ``entities``
        (text, type, character start/end, score = mean probability of the entity's predicted tags)."""
        import re

        from seqeval.metrics.sequence_labeling import get_entities

        offsets = [[(m.start(), m.end()) for m in re.finditer(r"\S+", t)] for t in texts]
        words = [[t[a:b] for a, b in offs] for t, offs in zip(texts, offsets, strict=True)]
        records = TaggedSentences(words, None, "input", list(range(1, len(texts) + 1)))
        data = self.prepare(records, built.tokenizer, self.run)
        probs, _, _ = self.word_scores(built.model, data, batch_size=batch_size, runtime=runtime)
        rows = []
        for text, offs, p in zip(texts, offsets, probs, strict=True):
            best = p.argmax(-1)
            tags = [self.labels[k] for k in best]
            score = p[np.arange(len(best)), best]
            entities = [] if self.run.task.scheme == "none" else [
                {"text": text[offs[s][0] : offs[e][1]], "type": typ, "start": offs[s][0], "end": offs[e][1],
                 "score": round(float(score[s : e + 1].mean()), 6)}
                for typ, s, e in get_entities(tags)
            ]
            rows.append({"entities": entities, "tags": from_iob2(tags, self.run.task.scheme)})
        return rows

    @staticmethod
    def baseline_metrics(train: TaggedSentences, evaluation: TaggedSentences) -> dict[str, float]:
        """``all_o_accuracy``: word accuracy of tagging every word ``O`` (entity F1 of that is 0)."""
        words = [t for seq in evaluation.tags or [] for t in seq]
        return {"all_o_accuracy": sum(t == "O" for t in words) / max(1, len(words))}


def _tokenizer(path: Path) -> Any:
    """A fast tokenizer (``word_ids`` needs one); byte-level BPE ones need ``add_prefix_space`` for words."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.is_fast:
        raise ConfigError(f"token classification needs a fast tokenizer (word_ids); {path} has "
                          f"{type(tok).__name__}", key="model")
    try:
        tok(["a", "b"], is_split_into_words=True)
    except Exception:  # e.g. RoBERTa/GPT-2: "add_prefix_space=True to use it with pretokenized inputs"
        tok = AutoTokenizer.from_pretrained(path, add_prefix_space=True)
    return tok


def _sample(n: int, k: int, seed: int) -> list[int]:
    """A seeded random sample of k of n sentence indices, kept in file order."""
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def read_tag_set(model_dir: Path) -> list[str]:
    """Tags of a saved tagger, from ``labels.json`` (or the config's id2label)."""
    p = model_dir / "labels.json"
    if p.is_file():
        return json.loads(p.read_text(encoding="utf-8"))["labels"]
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]


OBJECTIVE = TokenClassificationObjective
