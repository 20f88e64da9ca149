"""Config of causal-LM training on raw text (torch-free)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config.schema import TaskConfig
from tuneforge.objectives.configs.checks import refuse_head_only

__all__ = ["ClmConfig", "check_lm_method"]


def check_lm_method(run: Any, packed_documents: bool, other_packing: str) -> None:
    """No head-only method (the LM head is the pretrained output layer); no document packing with virtual
    tokens (they belong to the whole row, not to each packed document)."""
    refuse_head_only(run, "has none (the LM head is the pretrained output layer)")
    if packed_documents and run.method.virtual_tokens:
        raise ValueError(
            f"task.packing 'documents' cannot keep packed documents apart under method '{run.method.name}' (its "
            f"virtual tokens belong to the whole row); use task.packing={other_packing}")


class ClmConfig(TaskConfig):
    """Options of causal-LM training on raw text."""

    name: Literal["clm"] = "clm"
    packing: Literal["blocks", "documents"] = Field(
        "blocks", description="blocks: concatenate and cut (attention crosses documents); documents: pack whole "
        "documents with attention kept inside each")
    txt_unit: Literal["line", "paragraph", "file"] = Field(
        "line", description=".txt files: a document is a non-empty line, a blank-line-separated paragraph, or the file")
    add_eos: bool = Field(True, description="end every document with the EOS token")

    def check_run(self, run: Any) -> None:
        check_lm_method(run, self.packing == "documents", "blocks")
