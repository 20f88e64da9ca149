"""The method registry and the context a method's ``apply`` receives."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from tuneforge.config.schema import MethodConfig, register_method_config
from tuneforge.errors import ConfigError

__all__ = ["METHODS", "MethodContext", "MethodSpec", "get_method", "register"]


@dataclass
class MethodContext:
    """Facts about the loaded model that methods need.

    Attributes:
        head_names: parameters of the task head (always trainable).
        n_layers: number of transformer blocks.
    """

    head_names: set[str] = field(default_factory=set)
    n_layers: int = 0


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config class and runtime module path."""

    name: str
    config: type[MethodConfig]
    module: str

    def runtime(self) -> ModuleType:
        return importlib.import_module(self.module)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec
    register_method_config(spec.name, spec.config)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; allowed: {', '.join(sorted(METHODS))}", key="method")
    return METHODS[name]
