"""Extractive question answering: predict the answer span of a question in its context (SQuAD).

The task of SQuAD v1.1 (Rajpurkar et al. 2016) and v2.0 with unanswerable questions (Rajpurkar et al.
2018). The model is the architecture's ``AutoModelForQuestionAnswering`` head (one start and one end logit
per token), so a run directory loads in plain transformers. Preprocessing and post-processing follow
transformers' ``run_qa.py``, so numbers compare with the HF Trainer:

* question and context are tokenized together (``truncation="only_second"``); a context longer than one
  window of ``task.max_length`` tokens becomes several windows overlapping by ``task.doc_stride`` tokens
  (``return_overflowing_tokens``), and ``return_offsets_mapping`` maps tokens back to characters;
* a window's target is the answer's first and last token, or token 0 ([CLS]) when the answer is not wholly
  inside it (and for unanswerable questions);
* the loss is the mean of the start and end cross-entropies, as in transformers' QA heads;
* evaluation picks the best valid span over all windows of a question (`eval.squad.best_answers`) and
  scores it with the official SQuAD EM/F1 (`eval.squad.squad_metrics`), in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import TokenBatches
from tuneforge.data.squad import QAExamples, carve_by_group, read_squad, sample_questions
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.squad import best_answers, squad_metrics
from tuneforge.objectives.base import Built, TaskData, eval_batches
from tuneforge.objectives.configs.extractive_qa import ExtractiveQAConfig

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["ExtractiveQAConfig", "ExtractiveQAObjective", "QABatches", "QAOutputs"]

_POSITIONS = ("start_positions", "end_positions")


@dataclass
class QAOutputs:
    """Start and end logits of a batch; ``logits`` is both stacked, ``[B, T, 2]``."""

    start_logits: torch.Tensor
    end_logits: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        return torch.stack([self.start_logits, self.end_logits], dim=-1)


class QABatches(TokenBatches):
    """Windows ("features") of a split, padded per batch, plus what post-processing needs: the examples,
    the example of each window and each window's context offsets (``-1`` outside the context)."""

    def __init__(self, columns: dict[str, Any], pad_id: int, *, examples: QAExamples, feature_example: list[int],
                 offsets: list[np.ndarray], group_by_length: bool):
        super().__init__(columns, pad_id, group_by_length=group_by_length)
        self.examples = examples
        self.feature_example = feature_example
        self.offsets = offsets


def _cut_questions(tokenizer: Any, questions: list[str], limit: int) -> list[str]:
    """Questions longer than ``limit`` tokens are cut there (the window must keep room for context)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(off) <= limit else q[: off[limit - 1][1]]
            for q, off in zip(questions, enc["offset_mapping"], strict=True)]


def _answer_tokens(off: list[tuple[int, int]], seq: list[int | None], start_char: int, end_char: int) -> tuple[int, int]:
    """First and last token of the character span in this window, or (0, 0) when it is not wholly inside."""
    first = seq.index(1)
    last = len(seq) - 1 - seq[::-1].index(1)
    if off[first][0] > start_char or off[last][1] < end_char:
        return 0, 0
    s = first
    while s <= last and off[s][0] <= start_char:
        s += 1
    e = last
    while e >= first and off[e][1] >= end_char:
        e -= 1
    return s - 1, e + 1


def windows(examples: QAExamples, tokenizer: Any, task: ExtractiveQAConfig, *, group_by_length: bool = True) -> QABatches:
    """Tokenize a split into overlapping windows with their targets (see module docstring)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("extractive QA needs a fast tokenizer (character offsets); this model has none", key="model")
    questions = _cut_questions(tokenizer, [q.lstrip() for q in examples.questions], task.max_question_length)
    enc = tokenizer(questions, examples.contexts, truncation="only_second", max_length=task.max_length,
                    stride=task.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    mapping = list(enc["overflow_to_sample_mapping"])
    columns: dict[str, Any] = {"input_ids": enc["input_ids"]}
    if "token_type_ids" in enc and "token_type_ids" in tokenizer.model_input_names:
        columns["token_type_ids"] = enc["token_type_ids"]
    offsets, starts, ends = [], [], []
    for i, e in enumerate(mapping):
        seq = enc.sequence_ids(i)
        off = enc["offset_mapping"][i]
        offsets.append(np.array([o if s == 1 else (-1, -1) for o, s in zip(off, seq, strict=True)], dtype=np.int32))
        if examples.answers is not None:
            golds = examples.answers[e]
            s, t = _answer_tokens(off, seq, golds[0][1], golds[0][1] + len(golds[0][0])) if golds else (0, 0)
            starts.append(s)
            ends.append(t)
    if examples.answers is not None:
        columns["start_positions"], columns["end_positions"] = starts, ends
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return QABatches(columns, pad, examples=examples, feature_example=mapping, offsets=offsets,
                     group_by_length=group_by_length)


class ExtractiveQAObjective:
    """Implements the `Objective` (and `PredictiveObjective`) protocol for extractive QA."""

    name = "extractive_qa"
    default_metric = "f1"
    greater_is_better = True

    def __init__(self, run: RunConfig):
        self.run = run
        self.task: ExtractiveQAConfig = run.task  # type: ignore[assignment]

    # ----------------------------------------------------------------- data
    def _read(self, path: Path) -> QAExamples:
        return read_squad(path, allow_unanswerable=self.task.version_2_with_negative)

    def load_data(self, run: RunConfig) -> TaskData:
        d = run.data
        if d.train is None:
            raise ConfigError("a training file is required (e.g. data.train=train.json, SQuAD JSON or JSONL)",
                              key="data.train")
        train = self._read(d.train)
        notes = []
        if d.validation is not None:
            val = self._read(d.validation)
        else:
            train, val = carve_by_group(train, d.validation_split, run.train.seed)
            notes.append(f"validation: {len(val)} questions carved from {d.train} by whole articles/paragraphs "
                         f"(no context in both splits; seed {run.train.seed})")
        if d.max_train_samples and d.max_train_samples < len(train):
            train = train.subset(sample_questions(len(train), d.max_train_samples, run.train.seed))
            notes.append(f"train: a seeded random sample of {d.max_train_samples} questions")
        if d.max_eval_samples and d.max_eval_samples < len(val):
            val = val.subset(sample_questions(len(val), d.max_eval_samples, run.train.seed))
            notes.append(f"validation: a seeded random sample of {d.max_eval_samples} questions")
        splits: dict[str, Any] = {"train": train, "validation": val}
        if d.test is not None:
            splits["test"] = self._read(d.test)
        info = {"questions": {k: len(v) for k, v in splits.items()},
                "contexts": {k: len(set(v.contexts)) for k, v in splits.items()},
                "version_2_with_negative": self.task.version_2_with_negative}
        return TaskData(splits=splits, info=info, notes=notes)

    # ----------------------------------------------------------------- model
    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("extractive QA needs a fast tokenizer (character offsets); this model has none",
                              key="model")
        model, info = AutoModelForQuestionAnswering.from_pretrained(
            model_path, attn_implementation=run.model.attn_implementation, output_loading_info=True,
            dtype=torch.float32)
        if model.config.pad_token_id is None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return Built(model, tokenizer, sorted(info.get("missing_keys", [])))

    def prepare(self, records: QAExamples, tokenizer: Any, run: RunConfig) -> QABatches:
        return windows(records, tokenizer, run.task, group_by_length=run.train.group_by_length)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- training
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> QAOutputs:
        """Start/end logits of a batch. Prompt tuning prepends virtual tokens to the sequence: only the last
        ``T`` positions (the real tokens) are kept, so targets keep their indices."""
        out = model(**{k: v for k, v in batch.items() if k not in _POSITIONS})
        width = batch["input_ids"].shape[1]
        return QAOutputs(out.start_logits[:, -width:], out.end_logits[:, -width:])

    def loss(self, outputs: QAOutputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        start = F.cross_entropy(outputs.start_logits.float(), batch["start_positions"])
        end = F.cross_entropy(outputs.end_logits.float(), batch["end_positions"])
        return (start + end) / 2

    def window_logits(self, model: nn.Module, data: QABatches, *, batch_size: int, runtime: Runtime
                      ) -> tuple[list[np.ndarray], list[np.ndarray], float | None]:
        """Per-window start and end logits (unpadded, in window order) and the mean loss when targets exist."""
        n = len(data)
        starts: list[Any] = [None] * n
        ends: list[Any] = [None] * n
        total, count = 0.0, 0
        for indices, batch in eval_batches(model, data, batch_size, runtime):
            out = self.forward(model, batch)
            if "start_positions" in batch:
                total += float(self.loss(out, batch)) * len(indices)
                count += len(indices)
            s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for row, i in enumerate(indices):
                length = int(data.lengths[i])
                starts[i], ends[i] = s[row, :length], e[row, :length]
        return starts, ends, (total / count if count else None)

    def answers(self, model: nn.Module, data: QABatches, *, batch_size: int, runtime: Runtime):
        """(best answer per example, mean loss) of a prepared split."""
        starts, ends, loss = self.window_logits(model, data, batch_size=batch_size, runtime=runtime)
        t = self.task
        best = best_answers(starts, ends, data.offsets, data.feature_example, data.examples.contexts,
                            n_best=t.n_best, max_answer_length=t.max_answer_length,
                            version_2=t.version_2_with_negative, null_threshold=t.null_threshold)
        return best, loss

    def evaluate(self, model: nn.Module, data: QABatches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        best, loss = self.answers(model, data, batch_size=batch_size, runtime=runtime)
        golds = [[text for text, _ in g] for g in data.examples.answers or []]
        metrics: dict[str, Any] = squad_metrics([a.text for a in best], golds,
                                                version_2=self.task.version_2_with_negative)
        if loss is not None:
            metrics["loss"] = loss
        return metrics

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing besides the HF folder: the window settings live in the run's ``config.yaml``."""

    # ----------------------------------------------------------------- after training
    def load_state(self, model_dir: Path) -> None:
        """Nothing: extractive QA learns no label set from its data."""

    def from_saved(self, model_dir: Path) -> Built:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        from tuneforge.methods.saved import load_trained

        model = load_trained(AutoModelForQuestionAnswering, model_dir, dtype=torch.float32)
        return Built(model.eval(), AutoTokenizer.from_pretrained(model_dir))

    def read_split(self, path: Path) -> QAExamples:
        return self._read(path)

    def read_inputs(self, path: Path) -> tuple[list[str], list[str] | None]:
        """Questions and contexts of a prediction file (JSONL ``{question, context}`` rows or SQuAD JSON)."""
        ex = read_squad(path, allow_unanswerable=True)
        return ex.questions, ex.contexts

    def predict(self, built: Built, texts: list[str], pairs: list[str] | None, *, batch_size: int,
                runtime: Runtime) -> list[dict[str, Any]]:
        """The answer of each question in its context: text, character ``start``/``end`` and ``score`` (its
        probability among the n-best candidates). On the command line a row is ``"QUESTION ||| CONTEXT"``."""
        if pairs is None:
            split = [t.split("|||", 1) for t in texts]
            for i, parts in enumerate(split):
                if len(parts) != 2 or not parts[1].strip():
                    raise DataError("a question needs its context: give \"QUESTION ||| CONTEXT\" or an --input "
                                    "JSONL file of {question, context} rows", "command line", i + 1)
            texts, pairs = [p[0].strip() for p in split], [p[1].strip() for p in split]
        ex = QAExamples([str(i) for i in range(len(texts))], list(texts), list(pairs), None)
        data = windows(ex, built.tokenizer, self.task, group_by_length=False)
        best, _ = self.answers(built.model, data, batch_size=batch_size, runtime=runtime)
        return [{"answer": a.text, "start": a.start, "end": a.end, "score": round(a.probability, 6)} for a in best]

    @staticmethod
    def baseline_metrics(train: QAExamples, evaluation: QAExamples) -> dict[str, float]:
        """No model-free baseline is reported for span extraction."""
        return {}


OBJECTIVE = ExtractiveQAObjective
