"""Configs of the built-in extensions (torch-free, so recipes validate fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge.config.schema import ExtensionConfig

__all__ = ["ForgettingConfig", "SamplesConfig"]


class ForgettingConfig(ExtensionConfig):
    """The forgetting report. ``task.general_eval`` (the historical key) and ``general_eval`` here are the same
    setting; the report runs when either names a file."""

    name: Literal["forgetting"] = "forgetting"
    general_eval: Path | None = Field(None, description="held-out general-text file (same layout as the training data)")


class SamplesConfig(ExtensionConfig):
    """Before/after generations in report.md for generative objectives (on by default for them)."""

    name: Literal["samples"] = "samples"
    enabled: bool = Field(True, description="false: skip the generations (saves a little time)")
