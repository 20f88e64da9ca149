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
from tuneforge.extensions.configs import (
    DistillConfig,
    EWCConfig,
    ForgettingConfig,
    L2SPConfig,
    ReplayConfig,
    SamplesConfig,
)
from tuneforge.methods.qat.config import QatReportConfig

register(ExtensionSpec("forgetting", ForgettingConfig, "tuneforge.extensions.forgetting", auto=True))
register(ExtensionSpec("samples", SamplesConfig, "tuneforge.extensions.samples", auto=True))
register(ExtensionSpec("l2sp", L2SPConfig, "tuneforge.extensions.l2sp"))
register(ExtensionSpec("ewc", EWCConfig, "tuneforge.extensions.ewc"))
register(ExtensionSpec("distill", DistillConfig, "tuneforge.extensions.distill"))
register(ExtensionSpec("replay", ReplayConfig, "tuneforge.extensions.replay"))
register(ExtensionSpec("qat", QatReportConfig, "tuneforge.methods.qat.report", auto=True))  # method=qat only

__all__ = ["EXTENSIONS", "Extension", "ExtensionSpec", "RunContext", "create_extensions", "register"]
