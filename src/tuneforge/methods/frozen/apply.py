"""Frozen backbone: only the head trains, on backbone features computed once.

Feature extraction (the seed texts' "frozen" strategy) runs the backbone once per example under
``inference_mode`` and caches the vector the head consumes; every epoch then trains the head alone on the
cache, so later epochs cost almost nothing. The objective says what the feature is and how the head maps
it to logits (``feature_head``, declared by ``ObjectiveSpec(feature_head=True)``), since that depends on the
task (the hidden state at the pooling token for sequence classification).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import Batches, TensorBatches
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError
from tuneforge.methods._reference import swap_reference
from tuneforge.methods.base import MethodContext, MethodRuntime, Reference

MULTI_UNSUPPORTED = (
    "a frozen-backbone run saves a whole transformers model (backbone + trained head), not an adapter folder "
    "with a manifest; there is nothing to attach beside another (load each saved folder as its own model)"
)


def apply(model: nn.Module, run: RunConfig, ctx: MethodContext) -> nn.Module:
    if not ctx.head_names:
        raise ConfigError("this model has no separate task head to train", key="method")
    for name, p in model.named_parameters():
        p.requires_grad_(name in ctx.head_names)
    return model


def training_view(model, run: RunConfig, objective, splits: dict[str, Batches], *, runtime: Runtime,
                  quiet: bool = False):
    """Return (module to train, splits as cached features) — or the inputs unchanged when caching is off."""
    if not run.method.cache_features:
        return model, splits
    if not objective.spec.feature_head:
        raise ConfigError(f"task '{run.task.name}' has no feature cache; set method.cache_features=false", key="method")
    extract, head = objective.feature_head(model)
    batch_size = run.train.eval_batch_size or 2 * run.train.batch_size
    cached = {}
    for split, data in splits.items():
        cached[split] = _features(model, extract, data, batch_size, runtime, f"features ({split})", quiet)
    return head, cached


def _features(model, extract, data: Batches, batch_size: int, runtime: Runtime, desc: str, quiet: bool) -> TensorBatches:
    """Features of every example, computed on the runtime device and kept on the CPU (the loop moves batches)."""
    was_training = model.training
    model.eval()
    n = len(data)
    plan = data.plan(0, batch_size, seed=0, shuffle=False)
    out: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = {}
    with runtime.inference():
        for indices in tqdm(plan, desc=desc, disable=quiet, leave=False):
            batch = runtime.to_device(data.collate(indices))
            feats = extract(batch).float().cpu()
            if out is None:
                out = torch.empty((n, *feats.shape[1:]), dtype=torch.float32)
            idx = torch.as_tensor(indices)
            out[idx] = feats
            for k in ("labels",):
                if k in batch:
                    extras.setdefault(k, torch.empty(n, dtype=batch[k].dtype))[idx] = batch[k].cpu()
    model.train(was_training)
    return TensorBatches({"features": out, **extras})


def reference(model: nn.Module) -> Reference:
    """The base: the head (the only trainable part) as it is now, swapped in inside the context."""
    return swap_reference(model)


METHOD = MethodRuntime(apply=apply, training_view=training_view, reference=reference,
                       multi_unsupported=MULTI_UNSUPPORTED)
