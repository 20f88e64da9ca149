"""Sequence-labelling metrics via seqeval (Nakayama 2018), the de-facto reimplementation of conlleval.

* ``f1``/``precision``/``recall``: entity-level micro averages in seqeval's default mode, which counts
  entities exactly as the CoNLL-2000/2003 ``conlleval`` script does (an ``I-X`` without ``B-X`` starts an
  entity; an entity is correct only if type and both boundaries match). This is the headline metric.
* ``strict_f1``: seqeval ``mode="strict"`` with the IOB2 scheme: ill-formed entities in the prediction (an
  ``I-`` that does not continue a ``B-``) count as no entity at all.
* ``per_type``: precision/recall/f1/support per entity type (default mode).
* ``accuracy``: word-level tag accuracy (``O`` words included, as conlleval reports it).

Plain tags without entity structure (POS tagging, ``entities=False``) are scored per word instead:
``accuracy`` plus macro-averaged ``precision``/``recall``/``f1`` over the tags (scikit-learn) and ``per_type``
per tag; there is no ``strict_f1``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ner_metrics", "tag_metrics"]


def ner_metrics(gold: list[list[str]], pred: list[list[str]], entities: bool = True) -> dict[str, Any]:
    """Metrics of predicted vs gold IOB2 tag sequences (one list of tags per sentence, equal lengths)."""
    if not entities:
        return tag_metrics(gold, pred)
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {
        t: {"precision": float(r["precision"]), "recall": float(r["recall"]), "f1": float(r["f1-score"]),
            "support": int(r["support"])}
        for t, r in report.items() if not t.endswith(" avg")
    }
    return {
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "strict_f1": float(f1_score(gold, pred, mode="strict", scheme=IOB2, zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)),
        "per_type": per_type,
    }


def tag_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
    """Word-level metrics of plain tags (POS): accuracy, macro P/R/F1 and per-tag figures."""
    from sklearn.metrics import precision_recall_fscore_support

    g = [t for seq in gold for t in seq]
    p = [t for seq in pred for t in seq]
    if len(g) != len(p):
        raise ValueError(f"{len(g)} gold tags but {len(p)} predicted")
    tags = sorted(set(g))
    pr, rc, f, s = precision_recall_fscore_support(g, p, labels=tags, zero_division=0)
    return {
        "f1": float(f.mean()), "precision": float(pr.mean()), "recall": float(rc.mean()),
        "accuracy": sum(a == b for a, b in zip(g, p, strict=True)) / max(1, len(g)),
        "per_type": {t: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f[i]), "support": int(s[i])}
                     for i, t in enumerate(tags)},
    }
