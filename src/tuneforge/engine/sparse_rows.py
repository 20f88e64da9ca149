"""Row-sparse word-embedding updates (``train.sparse_embeddings``): touch only the rows a step used.

A word embedding is often half of an encoder's parameters (MiniLM-L6: 11.7M of 22.7M), yet a batch of
short sentences looks up a few hundred of its 30,522 rows. With the dense gradient every step still zeroes
and fills a 30,522 x 384 gradient, takes its norm for clipping and runs AdamW over every row. With this
option the embedding returns a sparse gradient (``nn.Embedding(sparse=True)``: the looked-up rows only),
clipping takes its norm from those rows, and the update runs torch's fused AdamW kernel on the touched rows
alone ("lazy" Adam, as TensorFlow Addons' ``LazyAdam`` and torch's ``SparseAdam``, here with decoupled weight
decay: Loshchilov & Hutter 2019).

What it changes, and what it does not (``tests/unit/test_sparse_embeddings.py``):

* A row used by a step gets exactly AdamW's update: the kernel is the same, and its moments and the step
  count used for bias correction are AdamW's. A step that uses every row equals dense AdamW.
* A row a step does not use is left alone: dense AdamW would still decay its weights (``lr x
  weight_decay``) and move it by its decaying first moment; here neither happens until the row is used
  again. So this is an option, not the default: the trained model differs (benchmarks/README.md reports
  the accuracy beside the speed).

No library offers this for AdamW with weight decay (torch's ``SparseAdam`` has no weight decay and no fused
kernel; TF's ``LazyAdam`` is not torch), hence this module, built on torch's own fused AdamW kernel.

**Exact row gradients** (``train.embedding_row_grads``, on by default where they apply, `row_grads_apply`)
keep dense AdamW and save only the gradient's bookkeeping: the embedding still returns the looked-up rows,
clipping takes their norm, and `DenseRowsAdamW` scatters them into a dense gradient kept from step to step
(the rows the previous step wrote are zeroed first), so every row gets AdamW's update, decay and momentum
as before. What is skipped is zero-filling the whole [vocab, hidden] gradient every step, its norm and its
scaling by the clip factor (MiniLM-L6 on 2 CPU cores: 7.7 + 2.9 + 1.8 ms of a ~117 ms step; 1.08x on
``bench_classification.py``). The update is AdamW's on the same gradient; the clip factor's norm is summed
in another order, so runs agree with the dense path to float rounding, not bit for bit
(`tests/unit/test_sparse_embeddings.py` bounds it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

__all__ = ["DenseRowsAdamW", "RowSparseAdamW", "clip_grad_norm", "embedding_refusal", "enable_sparse_embedding",
           "row_grads_apply"]


def embedding_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s input embedding cannot return row gradients (None when it can): it must be a trainable
    ``nn.Embedding`` whose weight is not tied to the output layer (a tied LM head's gradient is dense anyway)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return "needs a model whose input embedding is an nn.Embedding"
    if not emb.weight.requires_grad:
        return "the input embedding does not train with this method (it is frozen); nothing to make sparse"
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return ("the input embedding is tied to the output layer, whose gradient covers every row; sparse updates "
                "would save nothing")
    return None


def enable_sparse_embedding(model: nn.Module) -> nn.Parameter:
    """Make ``model``'s input word embedding return sparse (row) gradients; returns its weight. Refused
    (naming ``train.sparse_embeddings``) for the reasons of `embedding_refusal`."""
    if why := embedding_refusal(model):
        raise ConfigError(why, key="train.sparse_embeddings")
    emb = model.get_input_embeddings()
    emb.sparse = True
    return emb.weight


def row_grads_apply(model: nn.Module) -> bool:
    """Whether `DenseRowsAdamW`'s exact row gradients apply to ``model``'s embedding: `embedding_refusal` has
    nothing against it, and it is a plain ``nn.Embedding`` (not a subclass such as a fake-quantised one)
    without ``max_norm``. The loop checks the rest (`engine.loops`)."""
    if embedding_refusal(model) is not None:
        return False
    emb = model.get_input_embeddings()
    return type(emb) is nn.Embedding and emb.max_norm is None and not emb.sparse


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (same norm, same ``max_norm / (norm + 1e-6)`` factor capped at 1)
    over dense and sparse gradients; a sparse gradient is coalesced first (repeated rows summed). With
    ``max_norm`` None or 0 only the norm is returned (nothing is scaled)."""
    dense, sparse = [], []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sparse.append(p.grad)
        else:
            dense.append(p.grad)
    norms = [torch.linalg.vector_norm(g._values(), 2.0) for g in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm(dense))
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
    if not max_norm:
        return total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if dense:
        torch._foreach_mul_(dense, coef.to(dense[0].device))
    for g in sparse:
        g._values().mul_(coef.to(g.dtype))
    return total


class RowSparseAdamW(torch.optim.AdamW):
    """Fused AdamW for dense gradients; for a sparse gradient, AdamW on the rows it holds (module docstring)."""

    def __init__(self, params: Any, **kwargs: Any):
        super().__init__(params, fused=True, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        held = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    held.append((group, p, p.grad))
                    p.grad = None  # AdamW refuses sparse gradients; the rows are updated below
        try:
            loss = super().step(closure)
        finally:
            for _, p, g in held:
                p.grad = g
        for group, p, g in held:
            self._rows_step(group, p, g.coalesce())
        return loss

    def _rows_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:  # the layout AdamW(fused=True) gives its state, so checkpoints look the same
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        rows = grad._indices()[0]
        if rows.numel() == 0:
            return
        weights, m, v = p[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows]
        state["step"] += 1
        beta1, beta2 = group["betas"]
        torch._fused_adamw_([weights], [grad._values().to(p.dtype)], [m], [v], [], [state["step"]],
                            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=False, maximize=group["maximize"])
        p.index_copy_(0, rows, weights)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)


class DenseRowsAdamW(torch.optim.AdamW):
    """Fused AdamW; a sparse (row) gradient is scattered into a dense one kept per parameter first, so the
    update is dense AdamW's (module docstring, "exact row gradients")."""

    def __init__(self, params: Any, **kwargs: Any):
        super().__init__(params, fused=True, **kwargs)
        self._dense: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = self._densify(p, p.grad.coalesce())
        return super().step(closure)

    def _densify(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The kept dense gradient of ``p`` holding ``grad``'s rows (zero elsewhere)."""
        dense, written = self._dense.get(p, (None, None))
        if dense is None:
            dense = torch.zeros_like(p)
        elif written is not None:
            dense.index_fill_(0, written, 0)  # the previous step's rows; every other row is still zero
        rows = grad._indices()[0]
        dense.index_copy_(0, rows, grad._values().to(dense.dtype))
        self._dense[p] = (dense, rows)
        return dense
