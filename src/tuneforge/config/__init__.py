"""Typed, validated configuration: YAML recipes plus ``key=value`` overrides."""

from tuneforge.config.loading import apply_overrides, load_config, parse_override, to_yaml
from tuneforge.config.schema import (
    DataConfig,
    ExtensionConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    StrictModel,
    TaskConfig,
    TrainConfig,
    register_extension_config,
    register_method_config,
    register_task_config,
)

__all__ = [
    "DataConfig",
    "ExtensionConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "StrictModel",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_override",
    "register_extension_config",
    "register_method_config",
    "register_task_config",
    "to_yaml",
]
