"""Optimizer parameter groups (weight decay × layer-wise LR decay) and the LR schedule.

Weight decay is not applied to biases and normalisation weights (1-D tensors), as in BERT and the HF
Trainer. Layer-wise learning-rate decay (LLRD; Howard & Ruder 2018, Clark et al. 2020 "ELECTRA") scales
the peak rate by ``decay ** (L + 1 - depth)``: the head and the layers above the last block (final norm,
pooler) keep the full rate, block k (1-based from the bottom) gets ``decay ** (L + 1 - k)`` and the
embeddings ``decay ** (L + 1)``. The schedule is transformers' ``get_scheduler`` (warmup then linear,
cosine or constant).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import TrainConfig
from tuneforge.models.anatomy import param_depth

__all__ = ["build_optimizer", "build_scheduler", "lr_scale", "param_groups"]


def lr_scale(depth: int, n_layers: int, decay: float | None) -> float:
    """LR multiplier of a parameter at ``depth`` (0 = embeddings, n_layers + 1 = top)."""
    if decay is None:
        return 1.0
    return decay ** (n_layers + 1 - depth)


def param_groups(
    model: nn.Module, cfg: TrainConfig, lr: float, n_layers: int, head_names: set[str] = frozenset(),
    scales: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (learning rate, weight decay). Head parameters get the full rate;
    ``scales`` (a method's ``lr_scales``) multiplies the rate of the parameters it names."""
    scales = scales or {}
    groups: dict[tuple[float, float], list[torch.Tensor]] = defaultdict(list)
    names: dict[tuple[float, float], list[str]] = defaultdict(list)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        depth = n_layers + 1 if name in head_names else param_depth(name, n_layers)
        scale = lr_scale(depth, n_layers, cfg.layer_lr_decay) * scales.get(name, 1.0)
        wd = 0.0 if p.ndim < 2 else cfg.weight_decay
        groups[(lr * scale, wd)].append(p)
        names[(lr * scale, wd)].append(name)
    return [
        {"params": params, "lr": group_lr, "weight_decay": wd, "names": names[(group_lr, wd)]}
        for (group_lr, wd), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))
    ]


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, *, row_grads: bool = False
                    ) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``groups`` (the ``names`` key is kept for inspection and ignored by torch).

    AdamW uses the fused kernel: one pass over parameter, gradient and both moments; on CPU it is ~7x
    faster than the ``foreach`` implementation (measured: 77 ms vs 540 ms per step for MiniLM's 22.7M
    params), which matters because the update is a large share of a small model's step.

    Adafactor is torch's own (``torch.optim.Adafactor``, Shazeer & Stern 2018): factored second moments, no
    first moment, and each step scaled by ``max(1e-3, RMS(w))`` so a weight moves relative to its size. The
    group rate (the schedule's) caps the relative step. A T5 built from scratch needs it: its attention has
    no 1/sqrt(d) scaling and its query weights start at std (d_model * d_kv)^-1/2, so AdamW's absolute steps
    of size lr grow the attention logits far faster than the embeddings (std 1) learn. On Multi30k (4+4 x
    256, batch 64) held-out loss after 100 steps was 4.52 with Adafactor at 1e-2 and 5.16 with AdamW at
    1.5e-3; after 150 steps 4.05 with Adafactor and 5.24 with AdamW at 5e-4 (AdamW at 1.5e-3 needed ~500
    steps to reach 4.02).
    """
    if not groups:
        raise ValueError("no trainable parameters")
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=groups[0]["lr"])
    if cfg.sparse_embeddings:  # the row-sparse word embedding (`engine.sparse_rows`)
        from tuneforge.engine.sparse_rows import RowSparseAdamW

        return RowSparseAdamW(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    if row_grads:  # exact row gradients of the word embedding, dense AdamW (`engine.sparse_rows`)
        from tuneforge.engine.sparse_rows import DenseRowsAdamW

        return DenseRowsAdamW(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    return torch.optim.AdamW(groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=True)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, opt, num_warmup_steps=min(warmup, total_steps), num_training_steps=total_steps)
