"""Fine-tuning methods, one folder each, registered by one line below.

A method is a config class (``<name>/config.py``, no torch import, so recipes validate fast) and a
runtime module (``<name>/apply.py``) with ``apply(model, run, ctx) -> model``; it may also define
``training_view(...)`` to train on something other than the full model (the frozen method trains the
head on cached features). Methods wrap models from outside and never edit model code.
"""

from __future__ import annotations

from tuneforge.methods.base import METHODS, MethodContext, MethodSpec, get_method, register
from tuneforge.methods.frozen.config import FrozenConfig
from tuneforge.methods.full.config import FullConfig
from tuneforge.methods.partial.config import PartialConfig

register(MethodSpec("full", FullConfig, "tuneforge.methods.full.apply"))
register(MethodSpec("frozen", FrozenConfig, "tuneforge.methods.frozen.apply"))
register(MethodSpec("partial", PartialConfig, "tuneforge.methods.partial.apply"))

__all__ = ["METHODS", "MethodContext", "MethodSpec", "get_method", "register"]
