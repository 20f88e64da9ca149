"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded over ranks.

``train.distributed=fsdp`` under a launcher shards every transformer block (the classes a Hugging Face model
lists in ``_no_split_modules``, which are exactly the units it must not split) and then the root, so one
block's full weights exist only while it runs. Gradients are reduce-scattered and averaged over ranks; the
loop weights each rank's loss as under DDP (`engine.distributed`), so 2 ranks x b equals 1 process x 2b.
pytorch#162338 reports FSDP2 on gloo summing instead of averaging; with torch 2.13 the averaged gradient
equals one process's (tested in tests/distributed), so no compensation is applied; the test would catch a
regression.

Checkpoints (`save_sharded` / `load_sharded`) use ``torch.distributed.checkpoint``: every rank writes its own
shards of the trainable parameters and optimizer state into one folder, built under a temporary name and
renamed by rank 0 once complete (atomic like every checkpoint), and DCP reshards on load, so a run resumes at
another world size (or in one process). At the end of training the full weights are gathered to rank 0
(`full_state`), which writes the usual plain Hugging Face folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["full_state", "gradient_sync", "is_fsdp", "load_sharded", "load_sharded_trainable", "save_sharded",
           "shard_model", "trainable_names"]

def _block_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard_model(model: nn.Module) -> nn.Module:
    """``model`` with ``fully_shard`` applied to each block, then to the root (in place; returns it)."""
    from torch.distributed.fsdp import fully_shard

    blocks = _block_classes(model)
    for m in model.modules():
        if m is not model and type(m).__name__ in blocks:
            fully_shard(m)
    fully_shard(model)
    return model


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP2's counterpart of DDP ``no_sync``: no reduce-scatter in this backward when not ``enabled``."""
    module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    keep = trainable_names(model)  # frozen weights never change: not copied (as in every checkpoint)
    return {"model": {k: v for k, v in msd.items() if k in keep}, "optim": osd}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable weights and the optimizer state into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(model, optimizer), checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what `save_sharded` wrote into ``model``/``optimizer``, resharded to this world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _states(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))


def load_sharded_trainable(folder: Path, model: nn.Module) -> None:
    """The trainable weights of a sharded checkpoint into a plain (unsharded) ``model``, in this process alone."""
    import torch.distributed.checkpoint as dcp

    params = dict(model.named_parameters())
    state = {"model": {k: params[k].detach().clone() for k in trainable_names(model)}}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    with torch.no_grad():
        for k, v in state["model"].items():
            params[k].copy_(v)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the sharded ``model`` gathered, on rank 0's CPU (empty elsewhere; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
