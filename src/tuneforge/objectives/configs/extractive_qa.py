"""Config of extractive question answering (SQuAD-style span extraction; torch-free).

Extractive QA (SQuAD v1.1, Rajpurkar et al. 2016; v2.0 with unanswerable questions, Rajpurkar et al. 2018)
predicts the answer as a start and an end token of the context. Contexts longer than one window are cut
into overlapping windows (``doc_stride`` tokens of overlap), as the reference ``run_qa.py`` of transformers.
``task.max_length`` (default 384, the SQuAD convention) is the window length; ``data.max_length`` (whose
default of 128 suits sentence classification) is not used by this task.

Methods: every registered method trains QA (``tests/unit/test_qa_matrix.py``). ``frozen`` needs
``method.cache_features=false``: feature caching needs one pooled vector per example (``ObjectiveSpec
(feature_head=True)``), while the QA head reads every token, so the cached path refuses with a `ConfigError`
saying so; without the cache only ``qa_outputs`` trains. ``prefix``/``ptuning_v2``/``prompt`` go through
peft's QA wrapper; soft prompts are prepended, so the objective keeps the logits of the real tokens only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig

__all__ = ["ExtractiveQAConfig"]

SPECIAL_TOKENS_ALLOWANCE = 3  # [CLS] question [SEP] context [SEP]


class ExtractiveQAConfig(TaskConfig):
    """Options of extractive question answering."""

    name: Literal["extractive_qa"] = "extractive_qa"
    max_length: int = Field(384, ge=32, le=8192, description="tokens per window (question + context part)")
    doc_stride: int = Field(128, ge=0, description="tokens of overlap between consecutive context windows")
    max_question_length: int = Field(64, ge=4, description="questions are cut to this many tokens")
    n_best: int = Field(20, ge=1, description="start/end candidates per window in post-processing")
    max_answer_length: int = Field(30, ge=1, description="longest answer span in tokens")
    version_2_with_negative: bool = Field(False, description="SQuAD v2: questions may have no answer")
    null_threshold: float = Field(0.0, description="v2: predict no answer when null score - best span score > this")

    def check_run(self, run: Any) -> None:
        room = self.max_length - self.max_question_length - SPECIAL_TOKENS_ALLOWANCE
        if self.doc_stride >= room:
            raise ValueError(f"task.doc_stride ({self.doc_stride}) must be smaller than the context room of a window: "
                             f"task.max_length {self.max_length} - task.max_question_length {self.max_question_length} "
                             f"- {SPECIAL_TOKENS_ALLOWANCE} special tokens = {room}")
