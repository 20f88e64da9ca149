"""Reading SQuAD-format question answering data, validated before any model loads.

Two layouts are accepted:

* the SQuAD v1.1 / v2.0 JSON of Rajpurkar et al. (2016, 2018):
  ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
  "answer_start"}], "is_impossible"?}]}]}]}``;
* flat JSONL, one question a line, in the layout of the Hugging Face ``squad`` dataset:
  ``{"id"?, "question", "context", "answers": {"text": [...], "answer_start": [...]}}``.

Every answer is checked against its context (``context[answer_start:answer_start + len(text)] == text``); a
mismatch is a `DataError` naming the file and the line (JSONL) or the question id (JSON), because a shifted
offset silently teaches the model a wrong span. Each question keeps a ``group`` (its article in JSON, its
context in JSONL) so a validation split can be carved without sharing a context with training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.readers import read_table
from tuneforge.errors import DataError

__all__ = ["QAExamples", "carve_by_group", "read_squad", "sample_questions"]


@dataclass
class QAExamples:
    """One split: questions with their contexts and gold answers (``(text, char start)`` pairs; empty for an
    unanswerable v2 question), plus the carving group and source location of each question."""

    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]] | None
    groups: list[str] = field(default_factory=list)
    source: str = ""
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: Sequence[int]) -> QAExamples:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return QAExamples(pick(self.ids), pick(self.questions), pick(self.contexts),
                          pick(self.answers) if self.answers is not None else None,
                          pick(self.groups) if self.groups else [], self.source, pick(self.where) if self.where else [])


def _check_answer(context: str, text: Any, start: Any, path: Path, line: int | None, qid: str) -> tuple[str, int]:
    where = "" if line is not None else f"question {qid!r}: "
    if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
        raise DataError(f"{where}an answer needs a string 'text' and an integer 'answer_start' "
                        f"(got {text!r}, {start!r})", path, line)
    if context[start:start + len(text)] != text:
        raise DataError(f"{where}answer_start {start} does not point at the answer {text!r} in the context (the "
                        f"context there reads {context[start:start + len(text)]!r})", path, line)
    return text, start


def _read_json(path: Path, obj: Any) -> QAExamples:
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise DataError("a SQuAD JSON file needs a top-level 'data' list of articles", path)
    ex = QAExamples([], [], [], [], source=str(path))
    for a, article in enumerate(obj["data"]):
        title = str(article.get("title", a))
        for p, para in enumerate(article.get("paragraphs", [])):
            context = para.get("context")
            if not isinstance(context, str) or not context:
                raise DataError(f"article {a} ({title!r}) paragraph {p}: missing 'context'", path)
            for qa in para.get("qas", []):
                qid = str(qa.get("id", f"{a}-{p}-{len(ex)}"))
                question = qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    raise DataError(f"question {qid!r}: missing 'question'", path)
                golds = [] if qa.get("is_impossible") else [
                    _check_answer(context, g.get("text"), g.get("answer_start"), path, None, qid)
                    for g in qa.get("answers", [])]
                _add(ex, qid, question, context, golds, f"a{a}:{title}", f"question {qid}")
    return ex


def _read_jsonl(path: Path) -> QAExamples:
    ex = QAExamples([], [], [], [], source=str(path))
    table = read_table(path, "jsonl")  # one object per line, with line numbers (and gzip)
    for line_no, row in zip(table.lines, table.rows, strict=True):
        question, context = row.get("question"), row.get("context")
        if not isinstance(question, str) or not question.strip() or not isinstance(context, str) or not context:
            raise DataError("a row needs non-empty 'question' and 'context' strings", path, line_no)
        answers = row.get("answers") or {"text": [], "answer_start": []}
        if not isinstance(answers, dict) or len(answers.get("text", [])) != len(answers.get("answer_start", [])):
            raise DataError("'answers' must be {\"text\": [...], \"answer_start\": [...]} of equal lengths",
                            path, line_no)
        qid = str(row.get("id", line_no))
        golds = [_check_answer(context, t, s, path, line_no, qid)
                 for t, s in zip(answers["text"], answers["answer_start"], strict=True)]
        _add(ex, qid, question, context, golds, context, f"line {line_no}")
    return ex


def _add(ex: QAExamples, qid: str, question: str, context: str, golds: list[tuple[str, int]], group: str,
         where: str) -> None:
    ex.ids.append(qid)
    ex.questions.append(question)
    ex.contexts.append(context)
    ex.answers.append(golds)
    ex.groups.append(group)
    ex.where.append(where)


def read_squad(path: Path, *, allow_unanswerable: bool) -> QAExamples:
    """Read a SQuAD JSON or JSONL file (by content: a JSON document with 'data' is SQuAD JSON).

    ``allow_unanswerable`` (``task.version_2_with_negative``) accepts questions without an answer; otherwise
    they are a `DataError`, since a v1.1 model has no way to answer "nothing".
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    obj = None
    if stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # several JSON objects: JSONL
    ex = _read_json(path, obj) if isinstance(obj, dict) and "data" in obj else _read_jsonl(path)
    if not len(ex):
        raise DataError("no questions", path)
    if not allow_unanswerable:
        for golds, where in zip(ex.answers, ex.where, strict=True):
            if not golds:
                line = int(where.split()[1]) if where.startswith("line ") else None
                raise DataError(f"{'' if line else where + ': '}a question without an answer (SQuAD v2); set "
                                "task.version_2_with_negative=true to train with unanswerable questions", path, line)
    return ex


def sample_questions(n: int, k: int, seed: int) -> list[int]:
    """A seeded random sample of ``k`` of ``n`` question indices, in file order."""
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def carve_by_group(ex: QAExamples, share: float, seed: int) -> tuple[QAExamples, QAExamples]:
    """Split into (train, validation) by whole groups (articles in SQuAD JSON, contexts in JSONL), so that no
    context is in both; about ``share`` of the questions go to validation. Falls back from articles to
    paragraphs when there are fewer than two articles."""
    groups = ex.groups
    if len(set(groups)) < 2:
        groups = ex.contexts
    uniq = list(dict.fromkeys(groups))
    if len(uniq) < 2:
        raise DataError("cannot carve a validation split: every question shares one context; give data.validation",
                        ex.source)
    order = np.random.default_rng(seed).permutation(len(uniq))
    target = max(1, round(share * len(ex)))
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    val_groups: set[str] = set()
    taken = 0
    for i in order[:-1]:  # at least one group stays in training
        if taken >= target:
            break
        val_groups.add(uniq[i])
        taken += counts[uniq[i]]
    tr = [i for i, g in enumerate(groups) if g not in val_groups]
    va = [i for i, g in enumerate(groups) if g in val_groups]
    return ex.subset(tr), ex.subset(va)
