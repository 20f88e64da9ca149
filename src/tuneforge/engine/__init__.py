"""The one training loop, its optimizer/schedule, precision and checkpointing."""

from tuneforge.engine.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from tuneforge.engine.loop import FitResult, Trainer
from tuneforge.engine.optim import build_optimizer, build_scheduler, lr_scale, param_groups
from tuneforge.engine.precision import autocast_factory, cpu_has_bf16, resolve_precision

__all__ = [
    "FitResult",
    "Trainer",
    "TrainerState",
    "autocast_factory",
    "build_optimizer",
    "build_scheduler",
    "cpu_has_bf16",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_scale",
    "param_groups",
    "resolve_precision",
    "save_checkpoint",
]
