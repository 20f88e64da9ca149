"""Generation metrics of sequence-to-sequence runs: corpus BLEU (sacrebleu) and ROUGE (rouge-score).

* BLEU (Papineni et al. 2002) is ``sacrebleu.corpus_bleu`` with its defaults (13a tokenisation, exponential
  smoothing off, mixed case), 0-100, over all references of each source (sources with fewer references
  than the most get None in the missing streams, which sacrebleu signs ``nrefs:var``). The signature
  (``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.5.1``) is returned so every reported number
  says how it was computed (Post 2018, "A Call for Clarity in Reporting BLEU Scores").
* ROUGE-1/2/L/Lsum (Lin 2004) are ``rouge_score.RougeScorer`` F-measures, 0-1, with Porter stemming on
  (``use_stemmer=True``, as the HF summarisation examples and the SciTLDR paper use), the best over the
  references of each source (``score_multi``), averaged over sources. ROUGE-Lsum reads sentences from
  newlines: texts are split into sentences after ``.``, ``!`` or ``?`` followed by a space (a regex; the
  HF examples use nltk's punkt, which needs a download this tool cannot assume).

Both libraries are the references themselves: this module only shapes inputs (tests compare against
calling them directly).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["ROUGE_KEYS", "bleu", "generation_metrics", "rouge", "sentences"]

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> str:
    """``text`` with one sentence a line (what ROUGE-Lsum expects)."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """(corpus BLEU 0-100, sacrebleu signature) of ``hypotheses`` against one or more references each."""
    from sacrebleu.metrics import BLEU

    n = max((len(r) for r in references), default=1)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(n)]
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), streams)
    return float(score.score), str(metric.get_signature())


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, stemming: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure (0-1), best reference per source (see module docstring)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=stemming)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for hyp, refs in zip(hypotheses, references, strict=True):
        scores = scorer.score_multi([sentences(r) for r in refs], sentences(hyp))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    n = max(len(hypotheses), 1)
    return {key: value / n for key, value in totals.items()}


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
                       stemming: bool = True) -> dict[str, Any]:
    """``bleu``, ``rouge1`` ... ``rougeLsum``, ``gen_len`` (mean words) and ``bleu_signature``."""
    score, signature = bleu(hypotheses, references)
    out: dict[str, Any] = {"bleu": score, **rouge(hypotheses, references, stemming=stemming)}
    out["gen_len"] = sum(len(h.split()) for h in hypotheses) / max(len(hypotheses), 1)
    out["bleu_signature"] = signature
    out["rouge_stemming"] = stemming
    return out
