"""L2-SP (Li, Grandvalet & Davoine 2018, "Explicit inductive bias for transfer learning with convolutional
networks"): regularise fine-tuning toward the starting point instead of toward zero.

    loss += alpha/2 * sum ||w - w0||^2  (every anchored trainable weight, see `extensions.anchors`)
          + beta/2  * sum ||w||^2       (the new task head)

Its gradient is ``alpha (w - w0)`` (and ``beta w``), added to every micro-batch's loss (the engine averages
micro-batches, so once per optimizer step). ``w0`` is copied at ``on_train_start`` from the starting weights,
which a resumed run rebuilds too (the checkpoint loads afterwards), so checkpoints carry no extra copy.
No peer fine-tuning tool offers it; `retain: {l2sp: {alpha, beta}}` here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuneforge.extensions.anchors import Anchors, anchors
from tuneforge.extensions.base import Extension, RunContext

__all__ = ["L2SP", "create", "l2sp_penalty"]


def create(run: Any, cfg: Any, objective: Any, data: Any, listed: bool) -> L2SP:
    return L2SP(cfg.alpha, cfg.beta)


def l2sp_penalty(a: Anchors, alpha: float, beta: float) -> torch.Tensor:
    """``alpha/2 sum ||w - w0||^2 + beta/2 sum ||w_head||^2`` (a 0-d tensor, differentiable in w)."""
    terms = [alpha / 2 * (p - p0).pow(2).sum() for _, p, p0 in a.anchored if alpha]
    terms += [beta / 2 * p.pow(2).sum() for _, p in a.head if beta]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.float() for t in terms]).sum()


class L2SP(Extension):
    """The L2-SP term (see module docstring)."""

    def __init__(self, alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta
        self.anchors = Anchors()

    def on_train_start(self, ctx: RunContext) -> None:
        self.anchors = anchors(ctx.model, ctx.head_names)
        ctx.say(f"l2sp: {len(self.anchors.anchored)} tensors pulled toward their starting values (alpha {self.alpha:g})"
                + (f", {len(self.anchors.head)} head tensors decayed (beta {self.beta:g})" if self.beta else ""))

    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        return l2sp_penalty(self.anchors, self.alpha, self.beta)
