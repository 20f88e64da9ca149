"""Config of sequence-to-sequence fine-tuning (``task: seq2seq``; torch-free)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig
from tuneforge.objectives.configs.checks import refuse_head_only

__all__ = ["Seq2SeqConfig"]


class Seq2SeqConfig(TaskConfig):
    """Options of `tuneforge.objectives.seq2seq`: columns, target length and the generation settings of
    evaluation (BLEU and ROUGE come from generated text)."""

    name: Literal["seq2seq"] = "seq2seq"
    seq2seq: ClassVar[bool] = True
    source_column: str | int = Field("source", description="table files: column of the source text")
    target_column: str | int = Field("target", description="table files: column of the target (text or a list of "
                                     "references)")
    source_prefix: str = Field("", description="text put before every source (T5 style, e.g. 'summarize: ')")
    max_target_length: int = Field(128, ge=2, le=8192, description="truncate targets to this many tokens "
                                   "(sources: data.max_length)")
    generate_eval: bool | None = Field(
        None, description="generate and score BLEU/ROUGE: true at every evaluation, false never; default: the "
        "final evaluation and `tuneforge eval` only (evaluations during training report the loss)")
    num_beams: int = Field(4, ge=1, le=64, description="beam search width of evaluation and predict (1: greedy)")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="longest generated target")
    length_penalty: float = Field(1.0, description="beam search: exponent of the length normalisation (>1 longer)")
    no_repeat_ngram_size: int = Field(0, ge=0, description="forbid repeating n-grams of this size in outputs (0: off)")
    rouge_stemming: bool = Field(True, description="ROUGE with Porter stemming (rouge-score's use_stemmer)")
    max_generate_samples: int | None = Field(None, ge=1, description="score BLEU/ROUGE on the first N examples "
                                             "of a split only (generation is the slow part)")
    tie_encoder_decoder: bool = Field(False, description="bert2bert: encoder and decoder share their weights "
                                      "(Rothe et al. 2020's BERTShare)")

    def check_run(self, run: Any) -> None:
        refuse_head_only(run, "generates text through the whole encoder-decoder")
        if self.tie_encoder_decoder and run.model.architecture != "bert2bert":
            raise ValueError("task.tie_encoder_decoder applies to model.architecture=bert2bert only")
