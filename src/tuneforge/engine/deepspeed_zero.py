"""DeepSpeed ZeRO stage 1 and 2 (``train.distributed=deepspeed``): optimizer state (stage 1) and gradients
(stage 2) partitioned over the ranks, each rank keeping the full fp32 weights.

Shape of the integration: the loop stays ours (data plan, loss weighting, evaluation, the non-finite policy,
checkpoints); DeepSpeed owns what ZeRO partitions. `DeepSpeedStepper` takes the place of `Stepper`:
``deepspeed.initialize(model, optimizer=<our AdamW over our parameter groups>, config=...)`` returns the
engine, which runs forward, ``engine.backward`` (gradient reduction into partitions) and ``engine.step``
(clipping, the update of this rank's partition, then the all-gather of the new weights). Our learning-rate
schedule keeps driving the AdamW that ZeRO steps (ZeRO swaps the parameters inside its param groups, not
the groups). Accumulation marks the last micro-batch with ``set_gradient_accumulation_boundary``, so a
short last group of an epoch is exact too. Checkpoints: rank 0 writes the usual trainable weights
(identical on every rank) and every rank writes its optimizer partition with ``engine.save_checkpoint``
into ``deepspeed/`` of the same atomic folder (`save_shards`), read back by ``engine.load_checkpoint``.
The final model is the ordinary Hugging Face folder (ZeRO 1/2 never split the weights).

``train.deepspeed`` is passed through to DeepSpeed (a JSON file or a mapping; default ZeRO stage 2), except
what tuneforge already has a key for: batch sizes and accumulation (``train.batch_size``,
``train.grad_accum``), clipping (``train.max_grad_norm``), optimizer and schedule (``train.*``), precision
(``train.precision``: bf16 is our autocast over fp32 weights, not DeepSpeed's bf16 weights). Those are
filled in from ``train.*`` (``"auto"`` is accepted, as accelerate writes it) and a different value is a
`ConfigError` naming the key. Stage 3 partitions the weights themselves (evaluation on rank 0 alone and the
plain checkpoints would need them gathered) and is refused.

On CPUs DeepSpeed is told ``DS_ACCELERATOR=cpu``; its CPU accelerator uses gloo when oneCCL is absent, the
process group tuneforge already joined. Its shared-memory all-reduce op (a C++ JIT build, used only for
inference) is switched off (`import_deepspeed`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import TrainConfig
from tuneforge.engine.runtime import Runtime
from tuneforge.engine.stepping import NonFinitePolicy
from tuneforge.errors import ConfigError

__all__ = ["DeepSpeedStepper", "ds_config", "import_deepspeed"]

KEY = "train.deepspeed"
TAG = "deepspeed"  # the sub-folder of a checkpoint that DeepSpeed writes
_REFUSED = {
    "optimizer": "the optimizer is train.* (AdamW over tuneforge's parameter groups)",
    "scheduler": "the schedule is train.schedule / train.warmup_*",
    "fp16": "precision is train.precision",
    "bf16": "precision is train.precision (bf16 autocast over fp32 weights)",
    "amp": "precision is train.precision",
    "torch_autocast": "precision is train.precision",
}


def import_deepspeed(device: torch.device | None = None) -> Any:
    """The ``deepspeed`` module (``DS_ACCELERATOR=cpu`` first on a CPU); a `ConfigError` naming the key when it
    is not installed."""
    if device is not None and device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"train.distributed=deepspeed needs the deepspeed package ({e}); install the extra: "
                          "pip install 'tuneforge[deepspeed]'", key="train.distributed") from e
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # its INFO lines (config dumps, timers) on every rank drown the run's output
    # Its communication backend JIT-compiles a shared-memory all-reduce at start (C++, minutes on a busy CPU)
    # that only ``inference_all_reduce`` uses; training reduces through torch.distributed. Marked unavailable,
    # it is not built (DeepSpeed reads this dict when the backend starts; edits to it persist by design).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _user_config(value: str | dict | None) -> dict[str, Any]:
    if value is None:
        return {"zero_optimization": {"stage": 2}}
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = Path(value)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{KEY}={value}: cannot read the DeepSpeed config file ({e.strerror})", key=KEY) from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{KEY}={value}: not JSON ({e})", key=KEY) from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{KEY}={value}: a DeepSpeed config is a JSON object", key=KEY)
    return loaded


def ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: ``train.deepspeed`` with the keys tuneforge owns filled from ``train.*``
    (module docstring); a contradiction or an unsupported setting is a `ConfigError`."""
    out = _user_config(cfg.deepspeed)
    for k, why in _REFUSED.items():
        v = out.get(k)
        if v is not None and not (isinstance(v, dict) and not v.get("enabled", True)):
            raise ConfigError(f"{KEY}.{k} is not passed to DeepSpeed: {why}; remove it", key=f"{KEY}.{k}")
    zero = out.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{KEY}.zero_optimization must be a mapping", key=f"{KEY}.zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (1, 2):
        why = ("stage 3 partitions the weights themselves; use train.distributed=fsdp for that" if stage == 3 else
               "stage 0 is plain data parallelism, without ZeRO's non-finite gradient check; use train.distributed=ddp")
        raise ConfigError(f"{KEY}.zero_optimization.stage={stage}: tuneforge runs ZeRO stages 1 and 2 ({why})",
                          key=f"{KEY}.zero_optimization.stage")
    owned = {"train_micro_batch_size_per_gpu": ("train.batch_size", cfg.batch_size),
             "gradient_accumulation_steps": ("train.grad_accum", cfg.grad_accum),
             "train_batch_size": ("train.batch_size x processes x train.grad_accum",
                                  cfg.batch_size * world_size * cfg.grad_accum),
             "gradient_clipping": ("train.max_grad_norm", float(cfg.max_grad_norm or 0.0))}
    for k, (ours, value) in owned.items():
        given = out.get(k, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{KEY}.{k}={given} contradicts {ours} ({value}); set it there, or leave it out "
                              "(or \"auto\")", key=f"{KEY}.{k}")
        out[k] = value
    out.setdefault("steps_per_print", 2**31 - 1)  # DeepSpeed would log every 10 steps; the run logs its own
    return out


class DeepSpeedStepper:
    """`Stepper`'s contract (backward, step, state) carried out by a DeepSpeed engine (module docstring)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig,
                 runtime: Runtime, ckpt_root: Path):
        ds = import_deepspeed(runtime.device)
        self.config = ds_config(cfg, runtime.world_size)
        self.engine, self.zero_optimizer, _, _ = ds.initialize(model=module, optimizer=optimizer, config=self.config)
        self.optimizer, self.scheduler, self.runtime = optimizer, scheduler, runtime
        self.policy = NonFinitePolicy(cfg, ckpt_root, say=runtime.is_main)
        self.last_grad_norm: float | None = None
        self._micro = 0

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        """Accumulate the gradient of ``loss / n_micro``; the last of ``n_micro`` calls is the boundary at which
        ZeRO reduces (stage 1; stage 2 reduces into partitions on every call)."""
        self._micro += 1
        self._backward(loss / n_micro, boundary=self._micro >= n_micro)

    def _backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        if not boundary:
            self.engine.step()  # DeepSpeed's bookkeeping between micro-batches: no update off the boundary

    def discard(self, loss: torch.Tensor, n_micro: int) -> None:
        """Every rank agreed that this step has a non-finite loss: a NaN backward at the boundary, so that
        ZeRO sees non-finite gradients in `step` and drops the update together with what was accumulated."""
        self._backward(loss * float("nan"), boundary=True)

    def step(self, state: Any, loss_finite: bool) -> bool:
        """The engine's update (clipped; skipped by ZeRO on non-finite gradients), the schedule, the policy."""
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = float(norm) if norm is not None and applied else None
        if applied and loss_finite:
            self.policy.ok(state)
        else:
            self.policy.record(state)
        self.scheduler.step()
        self._micro = 0
        return applied

    def state_dict(self) -> dict[str, Any]:
        return {}  # everything lives in the engine's checkpoint (`save_shards`)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ checkpoints
    def save_shards(self, folder: Path) -> None:
        """Every rank writes its ZeRO partition of the optimizer state into ``folder/deepspeed`` (collective)."""
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_shards(self, folder: Path) -> None:
        """Restore what `save_shards` wrote (collective); only from a DeepSpeed checkpoint of this world size."""
        written = sorted((folder / TAG).glob("*zero_pp_rank_*_optim_states.pt"))
        if not written:
            raise ConfigError(f"{folder} was not written by train.distributed=deepspeed (no {TAG}/ optimizer "
                              "partitions); resume it with the train.distributed it was written with",
                              key="train.distributed")
        if len(written) != self.runtime.world_size:
            raise ConfigError(f"{folder} holds ZeRO optimizer partitions of {len(written)} ranks; resume it with "
                              f"{len(written)} processes (this run has {self.runtime.world_size})",
                              key="train.distributed")
        path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"DeepSpeed could not load {folder / TAG}", key="train.distributed")
