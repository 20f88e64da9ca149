"""Fine-tuning methods, one folder each, registered by one line below.

A method is a config class (``<name>/config.py``, no torch import, so recipes validate fast) and a
runtime module (``<name>/apply.py``) whose ``METHOD = MethodRuntime(apply=..., ...)`` declares what the
method can do (save/load, merge, a training view, a reference context, several adapters on one base;
see `methods.base`). Methods wrap models from outside and never edit model code.
"""

from __future__ import annotations

from tuneforge.methods.adapter.config import AdapterConfig
from tuneforge.methods.base import METHODS, MethodContext, MethodRuntime, MethodSpec, get_method, register
from tuneforge.methods.bitfit.config import BitFitConfig
from tuneforge.methods.frozen.config import FrozenConfig
from tuneforge.methods.full.config import FullConfig
from tuneforge.methods.ia3.config import IA3Config
from tuneforge.methods.lora.config import LoraConfig
from tuneforge.methods.partial.config import PartialConfig
from tuneforge.methods.prefix.config import PrefixConfig
from tuneforge.methods.prompt.config import PromptConfig
from tuneforge.methods.ptuning_v2.config import PtuningV2Config
from tuneforge.methods.qat.config import QatConfig
from tuneforge.methods.qlora.config import QLoraConfig

register(MethodSpec("full", FullConfig, "tuneforge.methods.full.apply"))
register(MethodSpec("frozen", FrozenConfig, "tuneforge.methods.frozen.apply"))
register(MethodSpec("partial", PartialConfig, "tuneforge.methods.partial.apply"))
register(MethodSpec("adapter", AdapterConfig, "tuneforge.methods.adapter.apply"))
register(MethodSpec("bitfit", BitFitConfig, "tuneforge.methods.bitfit.apply"))
register(MethodSpec("lora", LoraConfig, "tuneforge.methods.lora.apply"))
register(MethodSpec("qlora", QLoraConfig, "tuneforge.methods.qlora.apply"))
register(MethodSpec("ia3", IA3Config, "tuneforge.methods.ia3.apply"))
register(MethodSpec("prefix", PrefixConfig, "tuneforge.methods.prefix.apply"))
register(MethodSpec("ptuning_v2", PtuningV2Config, "tuneforge.methods.ptuning_v2.apply"))
register(MethodSpec("prompt", PromptConfig, "tuneforge.methods.prompt.apply"))
register(MethodSpec("qat", QatConfig, "tuneforge.methods.qat.apply"))

__all__ = ["METHODS", "MethodContext", "MethodRuntime", "MethodSpec", "get_method", "register"]
