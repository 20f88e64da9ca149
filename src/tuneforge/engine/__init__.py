"""The engine: runtime (device, precision, ranks), loops and the pieces they share (optimizer groups and
schedule, stepping with the non-finite policy, evaluation tracking, checkpoint and resume)."""

from tuneforge.engine.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from tuneforge.engine.loop import SupervisedLoop, Trainer
from tuneforge.engine.loops import FitResult, LoopBase, LoopContext, LoopSpec, create_loop
from tuneforge.engine.optim import build_optimizer, build_scheduler, lr_scale, param_groups
from tuneforge.engine.runtime import (
    BF16_MIN_SPEEDUP,
    Runtime,
    available_devices,
    cpu_bf16_speedup,
    cpu_has_bf16,
    resolve_device,
    resolve_precision,
)

__all__ = [
    "BF16_MIN_SPEEDUP",
    "FitResult",
    "LoopBase",
    "LoopContext",
    "LoopSpec",
    "Runtime",
    "SupervisedLoop",
    "Trainer",
    "TrainerState",
    "available_devices",
    "build_optimizer",
    "build_scheduler",
    "cpu_bf16_speedup",
    "cpu_has_bf16",
    "create_loop",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_scale",
    "param_groups",
    "resolve_device",
    "resolve_precision",
    "save_checkpoint",
]
