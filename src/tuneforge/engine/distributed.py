"""Several processes, one run: the process group, DDP wrapping and the collectives the engine needs.

A run becomes distributed when a launcher starts it: ``torchrun`` and ``accelerate launch`` both export
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and `init_from_env` reads
them (``env://`` rendezvous) to join the group: ``gloo`` on CPUs, ``nccl`` on CUDA, one device per local
rank. Nothing here runs at world size 1, so a single process behaves exactly as it always did.

How the work is split (see `engine.loop.SupervisedLoop`): every rank plans the epoch with the same seed
and the *global* micro-batch size (``batch_size x world_size``), then takes its contiguous share of each
global batch (`shard`). A run at world size N therefore sees the batches of one process at batch size
N x b, in the same order, and resume at any world size with the same N x b is exact.

Loss normalisation: each rank's loss is the mean over its own units (examples, or scored tokens for the
language-model objectives) and DDP averages gradients over ranks; weighting rank r's loss by
``N * units_r / sum(units)`` (`loss_weight`) makes that average the mean over the whole global batch, as
one process would compute it, even when shares are unequal (the last batch of an epoch, token counts).

Why a subclass of DDP: objectives call model methods (``get_output_embeddings``, ``get_input_embeddings``)
that `DistributedDataParallel` hides; `DDPModule` forwards unknown attributes to the wrapped module.
``forward_sync_buffers`` is off: HF models' buffers are constants, and broadcasting them on every forward
would make any forward on one rank alone (an evaluation) a collective that deadlocks.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tuneforge.errors import ConfigError

__all__ = [
    "DDPModule",
    "Placement",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "env_placement",
    "gather_objects",
    "init_from_env",
    "is_deepspeed_engine",
    "is_distributed",
    "loss_weight",
    "no_sync",
    "rank",
    "shard",
    "unwrap",
    "world_size",
    "wrap_ddp",
]

MODES = ("auto", "none", "ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class Placement:
    """This process's place in the launch: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by the launcher)") from e


def env_placement() -> Placement:
    """The placement a launcher exported (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); one process without."""
    ws = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if ws < 1 or not 0 <= rank < ws:
        raise ConfigError(f"launcher environment is inconsistent: RANK={rank}, WORLD_SIZE={ws}")
    return Placement(rank, local, ws)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(placement: Placement, device: torch.device, timeout_s: float | None = None) -> str:
    """Join the process group of ``placement`` (``env://``: ``MASTER_ADDR``/``MASTER_PORT`` from the launcher);
    returns the backend. Idempotent: a group already initialised (e.g. by accelerate) is kept.

    ``timeout_s`` (default ``TUNEFORGE_DIST_TIMEOUT_S`` or 2 hours) bounds every collective, including the
    waits of ranks 1.. while rank 0 alone evaluates or writes the final model: it must exceed those."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("TUNEFORGE_DIST_TIMEOUT_S", 7200))
    if dist.is_initialized():
        return dist.get_backend()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={placement.world_size} but {', '.join(missing)} is not set; start the run "
                          "with torchrun, accelerate launch or `tuneforge train --nproc N`")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds NCCL to this rank's GPU (no guessing from the current device)
    dist.init_process_group(backend, rank=placement.rank, world_size=placement.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    atexit.register(_destroy)
    return backend


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- wrapping
class DDPModule(DistributedDataParallel):
    """`DistributedDataParallel` that forwards unknown attributes to the wrapped model (see module docstring)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DDP (gradients averaged over ranks in backward); itself when nothing is trainable."""
    if not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DDPModule(model, device_ids=ids, forward_sync_buffers=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper or a DeepSpeed engine (the module itself otherwise)."""
    return module.module if isinstance(module, DistributedDataParallel) or is_deepspeed_engine(module) else module


def is_deepspeed_engine(module: Any) -> bool:
    """Whether ``module`` is a DeepSpeed engine (without importing deepspeed when nothing did)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(module, ds.DeepSpeedEngine)


def no_sync(module: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (no gradient all-reduce in this backward) when ``skip_sync``; a no-op otherwise.
    Forward and backward must both run inside it."""
    if skip_sync and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    if skip_sync:
        from tuneforge.engine.fsdp import gradient_sync, is_fsdp

        if is_fsdp(module):
            return gradient_sync(module, False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- data
def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch (sizes differ by at most one; may be empty)."""
    n = len(indices)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(indices[start : start + base + (1 if rank < extra else 0)])


def loss_weight(units: float, total_units: float, world: int) -> float:
    """Factor on a rank's mean loss so that DDP's average over ranks is the global-batch mean (module docstring)."""
    return world * units / total_units if total_units > 0 else 0.0


# ---------------------------------------------------------------------------------------------- collectives
def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64; one collective)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first(is_main: bool) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the others after it (e.g. read it)."""
    if not is_main:
        barrier()
    yield
    if is_main:
        barrier()
