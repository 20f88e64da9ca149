"""Turning a trained run into something that ships: merged plain Hugging Face folders, self-contained exports."""

from __future__ import annotations

from tuneforge.export.merge import MODEL_CLASSES, MergeResult, MergeUnsupportedError, merge_run, model_class

__all__ = ["MODEL_CLASSES", "MergeResult", "MergeUnsupportedError", "merge_run", "model_class"]
