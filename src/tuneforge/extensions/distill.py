"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network") as a
cure for forgetting: keep the fine-tuned model's outputs close to a teacher's on the training batches.

    loss += weight * T^2 * KL(softmax(t / T) || softmax(s / T))

``s`` are the objective's own scored logits (``outputs.logits``: ``[B, C]`` for classification, ``[N, V]`` at
the N supervised positions for the language-model objectives, so SFT distils on response tokens only) and
``t`` the teacher's on the same batch through the same objective; KL is averaged over those rows. The
``T^2`` keeps the gradient scale independent of T (Hinton et al.). torchtune's ``kd_ratio`` mixes
``(1 - r) * task + r * kd``; here the task loss keeps weight 1 and ``weight`` scales the KD term.

The teacher is, by default, the starting model itself through the method's reference context
(`MethodRuntime.reference`: adapters switched off, nothing copied; a frozen copy under full fine-tuning),
taken at ``on_train_start`` (the starting weights, also on ``--resume``); or ``teacher: PATH``, a tuneforge
run directory or a model folder the objective loads, checked on a probe batch to produce logits of the
student's shape (another vocabulary or label set is refused before the run directory exists).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError, TrainingError
from tuneforge.extensions.base import Extension, RunContext
from tuneforge.track.rundir import model_folder

__all__ = ["Distill", "create", "kd_loss"]

_KEY = "retain.distill.teacher"


def create(run: Any, cfg: Any, objective: Any, data: Any, listed: bool) -> Distill:
    if cfg.teacher is not None and not Path(cfg.teacher).exists():
        raise ConfigError(f"teacher not found: {cfg.teacher}", key=_KEY)
    if cfg.teacher is None:
        from tuneforge.methods import get_method

        if get_method(run.method.name).runtime().reference is None:
            raise ConfigError(f"method '{run.method.name}' has no reference context to distil from; set "
                              f"{_KEY} to a run or model folder", key=_KEY)
    return Distill(run, cfg, objective, data)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over rows."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    log_target=True, reduction="batchmean") * t * t


class Distill(Extension):
    """The distillation term (see module docstring)."""

    def __init__(self, run: Any, cfg: Any, objective: Any, data: Any):
        self.run, self.cfg, self.objective, self.data = run, cfg, objective, data
        self.teacher: Any = None  # a Reference: each call opens a context giving the teacher module

    def _load_teacher(self, ctx: RunContext) -> nn.Module:
        from tuneforge.inference import load_run
        from tuneforge.objectives import get_objective

        path = Path(self.cfg.teacher)
        if (path / "config.yaml").is_file():
            built = get_objective(load_run(path, [])).from_saved(model_folder(path))
        else:
            built = get_objective(self.run).from_saved(path)  # a fresh objective: ours keeps its label set
        return ctx.runtime.move(built.model).eval().requires_grad_(False)

    def on_build(self, ctx: RunContext) -> None:
        """Load a teacher given by path and check, on a probe batch, that its logits match the student's."""
        if self.cfg.teacher is None:
            return
        teacher = self._load_teacher(ctx)
        probe = self.objective.prepare(self.data.splits["validation"], ctx.built.tokenizer, self.run)
        batch = ctx.runtime.to_device(probe.collate(probe.plan(0, 2, seed=0, shuffle=False)[0]))
        student, was_training = ctx.built.model, ctx.built.model.training
        with torch.no_grad():
            s = self.objective.forward(student.eval(), batch).logits
            t = self.objective.forward(teacher, batch).logits
        student.train(was_training)
        if s.shape != t.shape:
            raise ConfigError(f"the teacher {self.cfg.teacher} scores {tuple(t.shape)} logits where the student "
                              f"scores {tuple(s.shape)}: another vocabulary or label set", key=_KEY)

        @contextmanager
        def frozen() -> Any:
            yield teacher

        self.teacher = frozen

    def on_train_start(self, ctx: RunContext) -> None:
        if self.teacher is not None:
            return
        from tuneforge.methods import get_method

        reference = get_method(self.run.method.name).runtime().reference
        if reference is None:
            raise ConfigError(f"method '{self.run.method.name}' has no reference context to distil from; set "
                              f"{_KEY} to a run or model folder", key=_KEY)
        self.teacher = reference(ctx.model)

    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        with torch.no_grad(), (self.teacher() if self.teacher is not None else nullcontext()) as teacher:
            target = self.objective.forward(teacher, batch).logits
        if target.shape != outputs.logits.shape:
            raise TrainingError(f"teacher logits {tuple(target.shape)} do not match the student's "
                                f"{tuple(outputs.logits.shape)}")
        return self.cfg.weight * kd_loss(outputs.logits, target, self.cfg.temperature)
