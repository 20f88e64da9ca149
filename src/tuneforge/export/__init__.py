"""Turning a trained run into something that ships: merged plain Hugging Face folders, self-contained exports."""

from __future__ import annotations

from tuneforge.export.merge import MergeResult, MergeUnsupportedError, merge_run

__all__ = ["MergeResult", "MergeUnsupportedError", "merge_run"]
