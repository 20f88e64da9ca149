"""Config of the contrastive sentence-embedding objective (torch-free).

Which data shape a file has is read from the data block: ``data.text_column`` (anchor) alone is unsupervised
text (SimCSE: each sentence twice under dropout); with ``data.text_pair_column`` it is pairs (anchor, positive),
with ``task.negative_column`` too triplets, and with a score in ``data.label_column`` scored pairs (STS).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig

__all__ = ["ContrastiveConfig"]


class ContrastiveConfig(TaskConfig):
    """Options of `tuneforge.objectives.contrastive`."""

    name: Literal["contrastive"] = "contrastive"
    loss: Literal["auto", "mnrl", "cosent"] = Field(
        "auto", description="mnrl: in-batch negatives (pairs, triplets, unsupervised); cosent: scored pairs; "
        "auto picks by the data")
    scale: float = Field(20.0, gt=0, description="similarity scale (1 / temperature) of both losses")
    pooling: Literal["mean", "cls"] = Field("mean", description="sentence vector: mean of token vectors, or [CLS]")
    negative_column: str | int | None = Field(None, description="triplets: column of the hard negative")
    scored: bool | None = Field(None, description="pairs carry a similarity score in data.label_column (STS); "
                                "default: when the file has that column")
    score_range: tuple[float, float] | None = Field(
        None, description="scored pairs: the scale scores must lie on, e.g. [0, 5] for STS-B (a score outside it is "
        "a data error naming file:line); default: any number")

    def check_run(self, run: Any) -> None:
        if run.method.virtual_tokens:
            raise ValueError(f"method.name '{run.method.name}' adds virtual tokens, which a bare encoder run has no "
                             "peft wrapper for; use full, lora, qlora, ia3, adapter, bitfit or partial")
        if run.method.head_only:
            raise ValueError(f"method.name '{run.method.name}' trains only a task head; a sentence encoder has none")
        if self.score_range is not None and not self.score_range[0] < self.score_range[1]:
            raise ValueError("task.score_range must be [low, high] with low < high")
        if self.negative_column is not None and run.data.text_pair_column is None:
            raise ValueError("task.negative_column needs data.text_pair_column (triplets: anchor, positive, negative)")
