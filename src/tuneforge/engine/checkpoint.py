"""Checkpoints: written atomically, rotated (last K plus the best), and loaded for exact resume.

A checkpoint is a folder ``checkpoints/step-00000123`` holding the trainable parameters
(``trainable.safetensors``; frozen weights never change, so they are not copied), the optimizer and
scheduler state (and the fp16 gradient scaler's), the RNG states (Python, torch CPU and CUDA, see
`Runtime.rng_state`), the state of run extensions (``extra.pt``) and ``state.json`` (step, data position,
best metric, counters). Tensors are loaded onto the CPU and copied into the model wherever it lives, so a
checkpoint written on a GPU resumes on a CPU and the other way round. The
folder is built under a temporary name and renamed into place, so a crash at any instant leaves either the
previous set of checkpoints or the new one, never a half-written one.

Under DDP (`engine.distributed`) the weights, optimizer and scheduler are the same on every rank, so rank 0
alone writes the checkpoint; the RNG states differ per rank (dropout), so each rank's is gathered to rank 0
and kept in ``rng-ranks.pt``. Every rank reads the same folder on resume and restores its own RNG state when
the world size is unchanged (rank 0's otherwise; data order does not depend on it, see `data.batching`).
Under FSDP each rank holds a shard, so every rank writes its shards with ``torch.distributed.checkpoint``
into rank 0's temporary folder (`engine.fsdp`); the folder holds ``.metadata`` and ``*.distcp`` instead of
``trainable.safetensors`` and is published by the same rename. Under DeepSpeed ZeRO 1/2 the weights are
whole on every rank but the optimizer state is partitioned: rank 0 writes the usual files and every rank
writes its partition into ``deepspeed/`` of the same temporary folder (``shards``, `engine.deepspeed_zero`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.engine import distributed as dist_
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError
from tuneforge.track.atomic import atomic_directory

__all__ = ["TrainerState", "latest_checkpoint", "load_checkpoint", "rotate_checkpoints", "save_checkpoint"]

_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    finished: bool = False
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    precision: str = ""  # what train.precision resolved to when written ("" in checkpoints from before it was kept)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (shared tensors saved once, under their first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().contiguous()  # no copy: safetensors writes it out right away
    return out


def save_checkpoint(
    ckpt_root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainerState,
    *, runtime: Runtime | None = None, extra: dict[str, Any] | None = None, shards: Any = None,
) -> Path:
    """Write ``ckpt_root/step-NNNNNNNN`` atomically; returns its path. ``extra``: other state to keep
    (the gradient scaler's, run extensions'), restored by `load_checkpoint`. ``shards``: what holds the
    optimizer state when it is partitioned over ranks (``save_shards(folder)``, called on every rank)."""
    final = ckpt_root / f"step-{state.step:08d}"
    runtime = runtime or Runtime.cpu()
    rng_ranks = dist_.gather_objects(runtime.rng_state()) if runtime.world_size > 1 else None
    sharded = runtime.distributed == "fsdp"
    if not runtime.is_main and not sharded and shards is None:  # rank 0 writes; the caller waits at a barrier
        return final
    with contextlib.ExitStack() as stack:
        tmp = None
        if runtime.is_main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(atomic_directory(final))
        if sharded:  # every rank writes its shards into rank 0's temporary folder
            from tuneforge.engine.fsdp import save_sharded

            tmp = dist_.broadcast_object(tmp)
            save_sharded(tmp, model, optimizer)
            if not runtime.is_main:
                return final
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        elif shards is not None:  # whole weights, partitioned optimizer state (DeepSpeed ZeRO)
            tmp = dist_.broadcast_object(tmp)
            shards.save_shards(tmp)  # collective; returns once every rank has written
            if not runtime.is_main:
                return final
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        else:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        torch.save(runtime.rng_state(), tmp / "rng.pt")
        if rng_ranks is not None:
            torch.save(rng_ranks, tmp / "rng-ranks.pt")
        if extra:
            torch.save(extra, tmp / "extra.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    return final


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with ``state.json``) sorted by step."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _is_sharded_model(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def is_sharded_checkpoint(ckpt: Path) -> bool:
    """Whether ``ckpt`` was written by FSDP ranks (``torch.distributed.checkpoint`` shards, `engine.fsdp`)."""
    return (Path(ckpt) / ".metadata").is_file()


def load_trainable(model: nn.Module, ckpt: Path) -> None:
    """Copy a checkpoint's trainable tensors into ``model`` (names must match exactly); a sharded (FSDP)
    checkpoint is gathered into a plain model in this process alone."""
    if is_sharded_checkpoint(ckpt):
        from tuneforge.engine.fsdp import load_sharded_trainable

        load_sharded_trainable(ckpt, model)
        return
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} has parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


def load_checkpoint(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, shards: Any = None,
) -> tuple[TrainerState, dict[str, Any]]:
    """Restore model, optimizer, scheduler and RNG from ``ckpt``; returns its trainer state and the
    ``extra`` state saved with it (empty when none). ``shards``: as in `save_checkpoint` (``load_shards``)."""
    optim = torch.load(ckpt / "optim.pt", weights_only=False, map_location="cpu")
    if shards is not None:  # DeepSpeed: its own checkpoints only (it says which it cannot read)
        shards.load_shards(ckpt)
    elif "optimizer" not in optim and not is_sharded_checkpoint(ckpt):
        raise ConfigError(f"{ckpt} was written by train.distributed=deepspeed, whose optimizer state is partitioned "
                          "over the ranks; resume it with deepspeed", key="train.distributed")
    elif is_sharded_checkpoint(ckpt):  # FSDP: resharded to this world size (or to one process)
        from tuneforge.engine.fsdp import load_sharded

        load_sharded(ckpt, model, optimizer)
    else:
        if _is_sharded_model(model):
            raise ConfigError(f"{ckpt} was written by one process or DDP; train.distributed=fsdp resumes only its own "
                              "(sharded) checkpoints: resume it with ddp", key="train.distributed")
        load_trainable(model, ckpt)
        # map_location: a GPU checkpoint opens on a CPU; load_state_dict moves optimizer state to each parameter
        optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    Runtime.set_rng_state(_rng_of_this_rank(ckpt))
    extra = torch.load(ckpt / "extra.pt", weights_only=False, map_location="cpu") if (ckpt / "extra.pt").is_file() else {}
    return TrainerState(**json.loads((ckpt / "state.json").read_text(encoding="utf-8"))), extra


def _rng_of_this_rank(ckpt: Path) -> dict[str, Any]:
    """This rank's saved RNG state when the checkpoint was written at the current world size, else rank 0's."""
    per_rank = ckpt / "rng-ranks.pt"
    if dist_.world_size() > 1 and per_rank.is_file():
        states = torch.load(per_rank, weights_only=False, map_location="cpu")
        if len(states) == dist_.world_size():
            return states[dist_.rank()]
    return torch.load(ckpt / "rng.pt", weights_only=False, map_location="cpu")


def rotate_checkpoints(ckpt_root: Path, keep_last: int, protect: int | None) -> None:
    """Delete all but the ``keep_last`` newest checkpoints, never the one at step ``protect`` (the best)."""
    found = list_checkpoints(ckpt_root)
    for step, path in found[:-keep_last] if keep_last else found:
        if step != protect:
            shutil.rmtree(path, ignore_errors=True)
