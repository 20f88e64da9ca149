"""Run extensions, one module each, registered by one line below (see `extensions.base`)."""

from __future__ import annotations

from tuneforge.extensions.base import (
    EXTENSIONS,
    Extension,
    ExtensionSpec,
    RunContext,
    create_extensions,
    register,
)
from tuneforge.extensions.configs import ForgettingConfig, SamplesConfig

register(ExtensionSpec("forgetting", ForgettingConfig, "tuneforge.extensions.forgetting", auto=True))
register(ExtensionSpec("samples", SamplesConfig, "tuneforge.extensions.samples", auto=True))

__all__ = ["EXTENSIONS", "Extension", "ExtensionSpec", "RunContext", "create_extensions", "register"]
