"""Config of the token-classification objective (NER, POS, chunking; torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig

__all__ = ["TokenClassificationConfig"]


class TokenClassificationConfig(TaskConfig):
    """Options of the token-classification objective (see `tuneforge.objectives.token_classification`).

    Data are CoNLL column files or JSON/JSONL ``{tokens, tags}`` rows (`tuneforge.data.conll`); ``scheme``
    names how the files write entities (converted to IOB2 inside, predictions written back in it).
    """

    name: Literal["token_classification"] = "token_classification"
    tag_column: int = Field(-1, description="CoNLL files: 0-based column of the tag (-1 = last)")
    scheme: Literal["iob1", "iob2", "bioes", "none"] = Field(
        "iob2", description="tagging scheme of the files; none = plain tags (POS): tag-level metrics, no entities"
    )
    label_all_tokens: bool = Field(
        False, description="label every sub-token (B- becomes I- on continuations); false = first sub-token only"
    )
    tokens_field: str = Field("tokens", description="JSON/JSONL: key of the word list")
    tags_field: str = Field("tags", description="JSON/JSONL: key of the tag list")
