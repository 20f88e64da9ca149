"""The objective contract (a Protocol, not a base class), its declared capabilities and the registry.

An objective owns everything task-specific: reading and validating its data (before any model loads),
building the model with the right head, tokenizing, the forward pass and the loss computed from its
outputs, evaluation metrics and prediction. The loop calls ``forward``, ``loss`` and ``evaluate``; the
pipeline calls the rest in order.

``forward(model, batch) -> outputs`` and ``loss(outputs, batch) -> Tensor`` are separate (torchtune's
``_loss_step``) so that a run extension can add a term from the same outputs (distillation needs the
logits) or from the parameters (L2-SP) without the objective knowing. ``outputs`` has ``.logits``: the
scores the loss is computed from (``[B, C]`` for classification, ``[N, V]`` at the N supervised token
positions for the language-model objectives, see `TokenLogits`).

What an objective *can* do beyond the Protocol is declared in its `ObjectiveSpec` (``generative``,
``pretrained_head``, ``feature_head`` ...) and every caller asks the spec, never the objective's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneforge.config.schema import RunConfig, TaskConfig, register_task_config
from tuneforge.errors import ConfigError
from tuneforge.registry import OBJECTIVES

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tuneforge.data.batching import Batches
    from tuneforge.engine.runtime import Runtime

__all__ = [
    "OBJECTIVES",
    "Built",
    "FeatureHeadObjective",
    "FinalEvalObjective",
    "GenerativeObjective",
    "Objective",
    "ObjectiveSpec",
    "PredictiveObjective",
    "TaskData",
    "TaskHeadObjective",
    "TokenLogits",
    "eval_batches",
    "final_evaluation",
    "get_objective",
    "get_spec",
    "register",
    "step_loss",
]


@dataclass
class TaskData:
    """Validated, untokenized splits plus what the model needs to know (e.g. the label set).

    ``splits`` maps split name ("train", "validation", optionally "test") to objective-defined records.
    """

    splits: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Built:
    """A loaded model and tokenizer, and the checkpoint keys the model had to initialize fresh."""

    model: nn.Module
    tokenizer: Any
    newly_initialized: list[str] = field(default_factory=list)


@dataclass
class TokenLogits:
    """Outputs of a token-level objective: ``logits`` [N, V] at the N supervised positions of a batch and
    the ``targets`` [N] they are scored against, in the same order."""

    logits: torch.Tensor
    targets: torch.Tensor


class Objective(Protocol):
    """What every objective implements (see module docstring)."""

    name: str
    default_metric: str
    greater_is_better: bool
    spec: ObjectiveSpec

    def load_data(self, run: RunConfig) -> TaskData:
        """Read and validate every split named by ``run.data`` (before any model loads)."""

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        """Load (or create) the model with this objective's head, and its tokenizer."""

    def prepare(self, records: Any, tokenizer: Any, run: RunConfig) -> Batches:
        """Tokenize one split into batches the loop can plan and collate."""

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """The model outputs of one (device-resident) batch; they carry ``.logits``."""

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's scalar loss from ``forward``'s outputs."""

    def evaluate(self, model: nn.Module, data: Batches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        """Metrics over a whole split (``loss`` among them), computed on ``runtime``'s device."""

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Files besides the HF folder that reloading needs (e.g. ``labels.json``)."""

    def from_saved(self, model_dir: Path) -> Built:
        """Load a saved model folder (any method, see `methods.saved`) for eval/predict/compare."""

    def read_split(self, path: Path) -> Any:
        """Read and validate an extra evaluation file (``tuneforge eval``, the forgetting report)."""

    def baseline_metrics(self, train: Any, records: Any) -> dict[str, float]:
        """Reference numbers for a split that need no model (e.g. majority-class accuracy); may be empty."""



class GenerativeObjective(Objective, Protocol):
    """Objectives whose spec says ``generative=True``: a causal LM that generate/chat can use."""

    def report_samples(self, model: nn.Module, tokenizer: Any) -> list[dict[str, Any]]:
        """A few held-out prompts with the model's greedy ``generation`` (the report's before/after)."""


class PredictiveObjective(Objective, Protocol):
    """Objectives whose spec says ``predicts=True``: ``tuneforge predict`` labels texts with them."""

    def read_inputs(self, path: Path) -> tuple[list[str], list[str] | None]:
        """Texts (and pairs) of a prediction input file."""

    def predict(self, built: Built, texts: list[str], pairs: list[str] | None, *, batch_size: int,
                runtime: Runtime) -> list[dict[str, Any]]:
        """One prediction row per text, in order."""


class FeatureHeadObjective(Objective, Protocol):
    """Objectives whose spec says ``feature_head=True``: the frozen method can cache backbone features."""

    def feature_head(self, model: nn.Module) -> tuple[Callable[[dict], torch.Tensor], nn.Module]:
        """(batch -> the features the head reads, module mapping cached features to outputs)."""


class FinalEvalObjective(Objective, Protocol):
    """Objectives whose spec says ``final_eval=True``: the end-of-run and ``tuneforge eval`` evaluation differs
    from the one run during training (seq2seq generates text and scores BLEU/ROUGE only there by default)."""

    def evaluate_final(self, model: nn.Module, data: Batches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        """Metrics over a whole split at the end of a run (see `final_evaluation`)."""


class TaskHeadObjective(Objective, Protocol):
    """Objectives whose spec says ``task_head=True``: one task of a multi-task run."""

    def load_state(self, model_dir: Path) -> None:
        """Restore what the objective learned from its data (e.g. the label set) from the files
        ``save_artifacts`` wrote into ``model_dir``, without loading a model."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: name, config class, the module whose ``OBJECTIVE`` class implements it, and
    what it can do.

    Attributes:
        generative: a causal LM (``generate``/``chat`` accept its runs; its report has before/after samples).
        model_class: the transformers auto class that loads its saved model (``tuneforge merge``).
        pretrained_head: the output layer is pretrained (an LM head), not a task head: methods treat only
            weights the checkpoint lacked as the head.
        evaluates_base_models: ``tuneforge eval MODEL`` can score a pretrained model as it is.
        chat: generative and trained on conversations (``generate`` defaults to chat mode for its runs).
        predicts: ``tuneforge predict`` labels texts with it (implements `PredictiveObjective`).
        feature_head: implements `FeatureHeadObjective` (the frozen method caches features).
        loop: the training loop shape (`tuneforge.engine.loops`), ``supervised`` by default.
        task_head: a head over the architecture's base model (``AutoModelFor...`` with ``base_model_prefix``)
            that a multi-task run can put beside other heads on one shared backbone; implements
            `TaskHeadObjective`.
        embeds: produces sentence vectors (``encode(built, texts, batch_size=, runtime=)``; ``tuneforge embed``).
        serve_route: ``tuneforge serve`` answers its runs' ``predict`` on ``/v1/<serve_route>`` (classify, tag,
            answer); empty: no task route.
        final_eval: implements `FinalEvalObjective` (`final_evaluation` calls its ``evaluate_final``).
        metric_scale: the headline metric's full scale (100 for SQuAD's percent EM/F1): a multi-task score
            averages headline metrics as fractions.
    """

    name: str
    config: type[TaskConfig]
    module: str
    generative: bool = False
    model_class: str = ""
    pretrained_head: bool = False
    evaluates_base_models: bool = False
    chat: bool = False
    predicts: bool = False
    feature_head: bool = False
    loop: str = "supervised"
    task_head: bool = False
    embeds: bool = False
    metric_scale: float = 1.0
    serve_route: str = ""
    final_eval: bool = False

    def create(self, run: RunConfig) -> Objective:
        """Instantiate the objective for one run (it may keep run state, e.g. class weights)."""
        objective = importlib.import_module(self.module).OBJECTIVE(run)
        objective.spec = self
        return objective

    def model_cls(self) -> Any:
        """The class named by ``model_class``: a transformers auto class, or ``"package.module:Class"``."""
        if not self.model_class:
            raise ConfigError(f"task '{self.name}' declares no model class to load its saved model", key="task")
        if ":" in self.model_class:
            module, _, name = self.model_class.partition(":")
            return vars(importlib.import_module(module))[name]
        import transformers

        return getattr(transformers, self.model_class)


def register(spec: ObjectiveSpec) -> None:
    """One line per objective in ``objectives/__init__.py``; a second registration of a name raises."""
    OBJECTIVES.register(spec.name, spec)
    register_task_config(spec.name, spec.config)


def get_spec(name: str) -> ObjectiveSpec:
    return OBJECTIVES.get(name)


def get_objective(run: RunConfig) -> Objective:
    """The objective of ``run.task``, instantiated for that run."""
    return get_spec(run.task.name).create(run)


def step_loss(objective: Objective, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``loss(forward(model, batch), batch)``: the objective's loss on one batch."""
    return objective.loss(objective.forward(model, batch), batch)


def final_evaluation(objective: Objective, model: nn.Module, data: Batches, *, batch_size: int,
                     runtime: Runtime) -> dict[str, Any]:
    """The objective's end-of-run evaluation: ``evaluate_final`` when it has one, else ``evaluate``."""
    run_eval = objective.evaluate_final if objective.spec.final_eval else objective.evaluate
    return run_eval(model, data, batch_size=batch_size, runtime=runtime)


def eval_batches(model: nn.Module, data: Batches, batch_size: int, runtime: Runtime,
                 collate: Callable[[list[int]], dict[str, Any]] | None = None
                 ) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """(indices, device batch) over ``data`` in order, the model in eval mode under inference mode and
    autocast; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    collate = collate or data.collate
    try:
        with runtime.inference():
            for indices in data.plan(0, batch_size, seed=0, shuffle=False):
                yield indices, runtime.to_device(collate(indices))
    finally:
        model.train(was_training)
