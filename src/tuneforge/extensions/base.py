"""Run extensions: work around a run that no objective or method owns, plugged in by one registration line.

An extension sees a run through hooks that the pipeline and the loop call for every registered, active
extension, in order, knowing none by name:

* ``on_build(ctx)``: the model is built, before the method wraps it (the base model);
* ``train_data(data, ctx) -> data``: the prepared training batches, which the extension may wrap (replay
  interleaves general batches); called before the run directory exists;
* ``on_train_start(ctx)``: the method is applied and the run directory exists; the weights are the starting
  ones, also on ``--resume`` (the checkpoint loads right after), so a snapshot taken here is the pretrained
  model's (L2-SP's anchor, EWC's Fisher, a distillation reference);
* ``extra_loss(model, batch, outputs)``: a term added to the objective's loss of every micro-batch (from
  the objective's outputs, e.g. logits for distillation, or the parameters, e.g. L2-SP); None adds nothing;
* ``on_eval(step, metrics)``: after each evaluation;
* ``on_end(ctx) -> block | None``: after training (best weights loaded); a returned block is stored in
  ``metrics.json`` under the extension's name, and ``report_section(block)`` may add a ``report.md`` section;
* ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint must keep for an exact resume.

Which extensions run: every spec registered with ``auto=True`` is offered each run and decides itself
(``create`` returns None when it does not apply: the forgetting report without a general file); others run
when the recipe lists them (``extensions: [{name: NAME, ...}]``). A listed extension that cannot apply
raises a `ConfigError` before the run directory exists.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.config.schema import ExtensionConfig, RunConfig, register_extension_config
from tuneforge.registry import EXTENSIONS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tuneforge.engine.runtime import Runtime
    from tuneforge.objectives.base import Built, Objective, TaskData

__all__ = ["EXTENSIONS", "Extension", "ExtensionSpec", "RunContext", "create_extensions", "register"]


@dataclass
class RunContext:
    """What the hooks see of a run; later fields are filled as the run gets there."""

    run: RunConfig
    objective: Objective
    data: TaskData
    runtime: Runtime
    quiet: bool = False
    built: Built | None = None  # after build: model (unwrapped base) and tokenizer
    model: nn.Module | None = None  # after the method is applied
    head_names: set[str] = field(default_factory=set)  # after the method: the parameters it trains as the head
    run_dir: Path | None = None  # once created
    training_view: bool = False  # the method trains on a view of the data (frozen: cached features)

    def say(self, msg: str) -> None:
        if not self.quiet and self.runtime.is_main:
            print(msg, flush=True)


class Extension:
    """Base class with every hook a no-op: an extension overrides only what it needs."""

    name: str = ""

    def on_build(self, ctx: RunContext) -> None:
        """The model is built; the method has not wrapped it yet."""

    def train_data(self, data: Any, ctx: RunContext) -> Any:
        """The training batches the loop will plan (default: ``data`` as it is)."""
        return data

    def on_train_start(self, ctx: RunContext) -> None:
        """The method is applied and the run directory exists; the weights are the starting ones (a resumed
        run loads its checkpoint after this hook); no step has run."""

    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """A term added to the loss of this micro-batch (None: nothing)."""
        return None

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """After an evaluation at optimizer step ``step``."""

    def on_end(self, ctx: RunContext) -> dict[str, Any] | None:
        """After training; a returned block goes into metrics.json under the extension's name."""
        return None

    def report_section(self, block: dict[str, Any] | None) -> str | None:
        """Markdown for report.md (None: no section)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State a checkpoint keeps (tensors allowed) so a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""


@dataclass(frozen=True)
class ExtensionSpec:
    """A registered extension: name, config class, runtime module (with ``create``) and whether it is
    offered every run (``auto``) or only when the recipe lists it."""

    name: str
    config: type[ExtensionConfig]
    module: str
    auto: bool = False

    def create(self, run: RunConfig, objective: Objective, data: TaskData) -> Extension | None:
        """The module's ``create(run, cfg, objective, data)``: an extension, or None when it does not apply."""
        listed = run.extension(self.name)
        if listed is None and not self.auto:
            return None
        cfg = listed if listed is not None else self.config(name=self.name)
        ext = importlib.import_module(self.module).create(run, cfg, objective, data, listed is not None)
        if ext is not None:
            ext.name = self.name
        return ext


def register(spec: ExtensionSpec) -> None:
    """One line per extension in ``extensions/__init__.py`` (or a user's module); a second registration raises."""
    EXTENSIONS.register(spec.name, spec)
    register_extension_config(spec.name, spec.config)


def create_extensions(run: RunConfig, objective: Objective, data: TaskData) -> list[Extension]:
    """The run's active extensions in registration-name order (their input checks run here, before the run
    directory exists)."""
    out = []
    for _, spec in EXTENSIONS.items():
        ext = spec.create(run, objective, data)
        if ext is not None:
            out.append(ext)
    return out
