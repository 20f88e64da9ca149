"""SQuAD metrics and the n-best post-processing that turns start/end logits into answer text.

Metrics follow the official evaluation scripts of SQuAD v1.1 (Rajpurkar et al. 2016) and v2.0 (Rajpurkar
et al. 2018): answers are normalised (lowercase, punctuation removed, the articles a/an/the removed,
whitespace collapsed); exact match (EM) and token-level F1 take the maximum over the gold answers and are
reported in percent. For v2 an unanswerable question's gold is the empty string, and the script's
``HasAns_*`` / ``NoAns_*`` breakdowns are added.

Post-processing is that of transformers' ``run_qa.py`` (``postprocess_qa_predictions``): over every window
of a question, the ``n_best`` highest start and end logits are paired; a pair is kept when both tokens lie
in the context (offsets of question and special tokens are masked), end >= start and the span is at most
``max_answer_length`` tokens. The best pair by start + end logit wins; with v2 the null answer (both at
token 0) wins when its score exceeds the best span's by more than ``null_threshold``.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Answer", "best_answers", "exact_match_score", "f1_score", "normalize_answer", "squad_metrics"]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official ``normalize_answer``)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the normalised answers; when either is empty, 1 if both are (the v2.0 script)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]], *, version_2: bool = False
                  ) -> dict[str, float]:
    """``exact_match`` and ``f1`` in percent (max over each question's gold answers); with ``version_2``
    also ``HasAns_exact_match``/``HasAns_f1``/``NoAns_exact_match``/``NoAns_f1`` and their counts. A
    question whose gold list is empty (or only blank answers) is unanswerable: its gold is ``""``."""
    em, f1, has = [], [], []
    for pred, answers in zip(predictions, golds, strict=True):
        refs = [a for a in answers if normalize_answer(a)] or [""]
        em.append(max(exact_match_score(pred, a) for a in refs))
        f1.append(max(f1_score(pred, a) for a in refs))
        has.append(refs != [""])
    pct = lambda xs: 100.0 * float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    out = {"exact_match": pct(em), "f1": pct(f1)}
    if version_2:
        has_idx = [i for i, h in enumerate(has) if h]
        no_idx = [i for i, h in enumerate(has) if not h]
        for name, idx in (("HasAns", has_idx), ("NoAns", no_idx)):
            out[f"{name}_exact_match"] = pct([em[i] for i in idx])
            out[f"{name}_f1"] = pct([f1[i] for i in idx])
            out[f"{name}_total"] = float(len(idx))
    return out


@dataclass
class Answer:
    """A predicted answer: text, character span in the context (``start == end == 0`` and text ``""`` for no
    answer), the span's logit score and its probability among the n-best candidates."""

    text: str
    start: int
    end: int
    score: float
    probability: float


def best_answers(start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray],
                 offsets: Sequence[np.ndarray], feature_example: Sequence[int], contexts: Sequence[str], *,
                 n_best: int = 20, max_answer_length: int = 30, version_2: bool = False,
                 null_threshold: float = 0.0) -> list[Answer]:
    """The best answer of each example (see module docstring).

    Args:
        start_logits, end_logits: per window, the logits of its tokens (unpadded).
        offsets: per window, ``[T, 2]`` character offsets into the context; ``-1`` rows mark tokens outside
            the context (question, special tokens), which are never part of an answer.
        feature_example: per window, the index of its example in ``contexts``.
    """
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for f, e in enumerate(feature_example):
        by_example[e].append(f)
    out = []
    for e, context in enumerate(contexts):
        candidates: list[tuple[float, int, int]] = []
        null_score = None
        for f in by_example.get(e, []):
            s, t, off = start_logits[f], end_logits[f], offsets[f]
            null = float(s[0] + t[0])
            null_score = null if null_score is None or null < null_score else null_score
            starts = np.argsort(s)[::-1][:n_best]
            ends = np.argsort(t)[::-1][:n_best]
            for i in starts:
                if off[i, 0] < 0:
                    continue
                for j in ends:
                    if off[j, 0] < 0 or j < i or j - i + 1 > max_answer_length:
                        continue
                    candidates.append((float(s[i] + t[j]), int(off[i, 0]), int(off[j, 1])))
        candidates.sort(key=lambda c: -c[0])
        candidates = candidates[:n_best]
        scores = [c[0] for c in candidates] + ([null_score] if version_2 and null_score is not None else [])
        probs = _softmax(np.asarray(scores)) if scores else np.zeros(0)
        if candidates and not (version_2 and null_score is not None and null_score - candidates[0][0] > null_threshold):
            score, a, b = candidates[0]
            out.append(Answer(context[a:b], a, b, score, float(probs[0])))
        else:
            p = float(probs[-1]) if version_2 and len(probs) else 0.0
            out.append(Answer("", 0, 0, float(null_score) if null_score is not None else 0.0, p))
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()
