"""The model of a run, wired the one way every verb does it: build with the objective, place it on the
runtime's device, find the task head, apply the method.

`train` and `compare` both call `wire`, so the head a method sees, the parameters it leaves trainable and
the counts a comparison reports are the ones training used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.config import RunConfig
from tuneforge.engine.runtime import Runtime
from tuneforge.methods import MethodContext, MethodRuntime, get_method
from tuneforge.models.anatomy import head_parameter_names, trainable_summary
from tuneforge.objectives.base import Built, Objective, TaskData

__all__ = ["Wired", "wire"]


@dataclass
class Wired:
    """A built model with its method applied."""

    built: Built  # the objective's build (model = the base before the method wrapped it)
    model: nn.Module  # the model after the method
    method: MethodRuntime
    ctx: MethodContext
    trainable: int
    total: int
    lr_scales: dict[str, float]  # parameter name -> factor of the run's rate (``MethodRuntime.lr_scales``)


def wire(run: RunConfig, objective: Objective, data: TaskData, model_path: Path, runtime: Runtime, n_layers: int,
         *, on_built: Callable[[Built], Any] | None = None) -> Wired:
    """Seed, build, move to the device, (``on_built``: look at the base model), apply the method."""
    from transformers import set_seed

    set_seed(run.train.seed)
    built = objective.build(run, model_path, data)
    built.model = runtime.move(built.model)
    if on_built is not None:
        on_built(built)
    # An LM head is pretrained, not a task head: methods treat only weights the checkpoint lacked as head.
    head = (set(built.newly_initialized) if objective.spec.pretrained_head
            else head_parameter_names(built.model, built.newly_initialized))
    ctx = MethodContext(head, n_layers)
    method = get_method(run.method.name).runtime()
    model = runtime.move(method.apply(built.model, run, ctx))  # layers a method adds land on the device too
    trainable, total = trainable_summary(model)
    scales = method.lr_scales(model) if method.lr_scales is not None else {}
    return Wired(built, model, method, ctx, trainable, total, scales)
