"""The method contract: the registry, the context a method's ``apply`` receives, and `MethodRuntime`.

A method is a torch-free config class (``<name>/config.py``) and a runtime module (``<name>/apply.py``)
whose ``METHOD = MethodRuntime(...)`` declares what the method can do. Callers ask those typed fields
(``runtime.merge is not None``), never a method's name:

* ``apply(model, run, ctx) -> model``: make the model train the method's parameters (required);
* ``save`` / ``load``: write only what the method trained, and rebuild it on a freshly loaded base
  (absent: the whole model is saved with ``save_pretrained``, see `methods.saved`);
* ``merge``: fold the method into plain transformers weights, or ``merge_unsupported`` says why not;
* ``training_view``: train on something other than the full model (frozen: the head on cached features);
* ``lr_scales(model) -> {parameter name: factor}``: parameters that train at a multiple of the run's rate
  (prefix tuning's reparameterisation MLP); the engine puts them in their own optimizer groups;
* ``reference(model) -> Reference``: a context in which the model computes as the untouched base (the
  reference model of DPO/KTO/PPO and distillation from the base, without a copy where the method allows);
* ``attach(model, folder, name)`` / ``activate(model, name)``: several saved method folders on one
  loaded base, one active at a time (the server); ``multi_unsupported`` says why a method cannot;
* ``self_contained``: ``save`` writes the whole model, so the manifest's base model is the folder itself
  (QAT: fp32 weights that ``load`` quantises).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneforge.config.schema import MethodConfig, register_method_config
from tuneforge.errors import ConfigError
from tuneforge.registry import METHODS

if TYPE_CHECKING:
    from torch import nn

__all__ = ["METHODS", "MethodContext", "MethodRuntime", "MethodSpec", "Reference", "get_method", "register"]


@dataclass
class MethodContext:
    """Facts about the loaded model that methods need.

    Attributes:
        head_names: parameters of the task head (always trainable).
        n_layers: number of transformer blocks.
    """

    head_names: set[str] = field(default_factory=set)
    n_layers: int = 0


class Reference(Protocol):
    """Made once per model before training (``runtime.reference(model)``); each call opens a context whose
    value is a module computing as the base model did before training (adapters disabled, a frozen copy...)."""

    def __call__(self) -> AbstractContextManager[nn.Module]: ...


@dataclass(frozen=True)
class MethodRuntime:
    """What a method can do; fields left ``None`` are capabilities it lacks (see module docstring)."""

    apply: Callable[..., nn.Module]
    save: Callable[[nn.Module, Path], None] | None = None
    load: Callable[[nn.Module, Path, Any], nn.Module] | None = None
    merge: Callable[[nn.Module], nn.Module] | None = None
    merge_unsupported: str | None = None
    training_view: Callable[..., tuple[nn.Module, dict[str, Any]]] | None = None
    lr_scales: Callable[[nn.Module], dict[str, float]] | None = None
    reference: Callable[[nn.Module], Reference] | None = None
    attach: Callable[[nn.Module, Path, str], nn.Module] | None = None
    activate: Callable[[nn.Module, str], None] | None = None
    multi_unsupported: str | None = None
    self_contained: bool = False

    def __post_init__(self) -> None:
        if (self.save is None) != (self.load is None):
            raise ValueError("a method defines save and load together (one is the inverse of the other)")
        if (self.attach is None) != (self.activate is None):
            raise ValueError("a method defines attach and activate together")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config class and runtime module path."""

    name: str
    config: type[MethodConfig]
    module: str

    def runtime(self) -> MethodRuntime:
        """The runtime module's ``METHOD`` (imported on first use: torch loads only when a run needs it)."""
        return importlib.import_module(self.module).METHOD


def register(spec: MethodSpec) -> None:
    """One line per method in ``methods/__init__.py``; a second registration of a name raises."""
    METHODS.register(spec.name, spec)
    register_method_config(spec.name, spec.config)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; allowed: {', '.join(METHODS.names())}", key="method")
    return METHODS.get(name)
