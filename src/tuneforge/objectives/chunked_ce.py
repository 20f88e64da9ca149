"""The output layer and the next-token cross-entropy in one pass over row chunks (``train.chunked_cross_entropy``).

Why: for a small LM with a large vocabulary the output layer's logits are the biggest tensors of a step.
SmolLM2-135M scores ~1,600 reply tokens per SFT micro-batch against 49,152 words: the bf16 logits, their fp32
copy for the loss, the log-softmax, its gradient and the zeroed buffer it is scattered into are each 160-320
MB, too large to stay in any cache and, on a CPU, fresh pages to fault in on every step. Measured there, the
log-softmax, its backward and those copies and fills took ~30% of the step (`benchmarks/README.md`).

What: per chunk of rows (a few MB of logits), the logits are computed in the precision the output layer
runs in (the autocast dtype, else the weight's), their log-sum-exp gives each row's NLL, and, when the
hidden states need a gradient, ``softmax - onehot`` times the weight gives that row's gradient at once (the
approach of Liger Kernel's fused linear cross-entropy, Hsu et al. 2024, in plain torch ops). The backward
only scales those stored [N, hidden] rows by the incoming per-token gradient: it is linear in it. No
[N, vocab] tensor outlives a chunk.

Numbers: the same as projecting and then calling ``F.cross_entropy`` up to rounding in the last bf16 bit:
the reference rounds ``g * (softmax - onehot)`` to bf16, this rounds ``softmax - onehot`` and scales after
(`tests/unit/test_chunked_ce.py` bounds loss and gradients against the reference).

Only for an output layer that is a plain ``nn.Linear`` whose weight (and bias) are frozen: LoRA and the
other PEFT methods, where the head is not trained. A trained head (full fine-tuning, pretraining) keeps the
plain projection, which its weight gradient needs anyway, except where autograd is off (evaluation, the
reference log-probs of DPO and KTO): no gradient is needed there, so any model's layer can run fused. The
caller checks once that the model returns the output layer's result unchanged (no logit soft-capping or
scaling after it, `head_output_is_logits`; `FusedHeads` does both checks).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["FusedHeads", "chunk_rows", "fusable_head", "head_output_is_logits", "linear_nll", "per_token_nll_head"]

# logits per chunk: on a CPU 32 MiB of fp32 (within glibc's largest mmap threshold, `engine.allocator`); smaller
# chunks stream the [vocab, hidden] weight once more per chunk (SmolLM2, 1,000 rows: 2^22 551 ms, 2^23 515 ms,
# 2^24 515 ms for the forward and backward); more on a GPU
_CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**25}


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk for a ``vocab``-word output layer on ``device``."""
    return max(8, min(4096, _CHUNK_ELEMENTS.get(device.type, 2**25) // max(vocab, 1)))


class _LinearNLL(torch.autograd.Function):
    """Per-row NLL of ``targets`` under ``hidden @ weight.T + bias`` (see module docstring)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        device = hidden.device
        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            n = h.shape[0]
            nll = torch.empty(n, dtype=torch.float32, device=device)
            grad = torch.empty(n, h.shape[1], dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
            step = max(1, min(n, chunk_rows(w.shape[0], device)))  # n = 0: a batch with nothing to score
            # [chunk, V] buffers for the whole call (fresh ones per chunk cost page faults on a CPU): two, or
            # one for fp32 logits, where the softmax runs in place with no copies
            same = dtype == torch.float32
            logits_buf = torch.empty(step, w.shape[0], dtype=dtype, device=device)
            probs_buf = logits_buf if same else torch.empty(step, w.shape[0], dtype=torch.float32, device=device)
            for s in range(0, n, step):
                e = min(n, s + step)
                logits, p = logits_buf[: e - s], probs_buf[: e - s]
                if b is None:  # in the layer's precision, as the model computes it
                    torch.mm(h[s:e], w.t(), out=logits)
                else:
                    torch.addmm(b, h[s:e], w.t(), out=logits)
                rows = torch.arange(e - s, device=device)
                tgt = targets[s:e]
                picked = logits[rows, tgt].float()
                top = logits.amax(dim=-1, keepdim=True).float()
                total = (p if same else p.copy_(logits)).sub_(top).exp_().sum(dim=-1, keepdim=True)
                nll[s:e] = (total.log() + top).squeeze(1) - picked
                if grad is not None:
                    p.div_(total)
                    p[rows, tgt] -= 1.0  # d NLL / d logits = softmax - onehot
                    torch.mm(p if same else logits.copy_(p), w, out=grad[s:e])
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        grad_hidden = None
        if grad is not None:
            grad_hidden = (grad.float() * grad_nll.float()[:, None]).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor) -> torch.Tensor:
    """Per-row next-token NLL [N] (fp32) of ``targets`` [N] under the frozen linear layer (``weight`` [V, H],
    ``bias`` [V] or None) applied to ``hidden`` [N, H], in the precision autocast gives that layer."""
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("linear_nll computes no weight gradient: the output layer must be frozen")
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    return _LinearNLL.apply(hidden, weight, bias, targets, dtype)


def fusable_head(model: nn.Module, *, needs_grad: bool = True) -> nn.Linear | None:
    """The model's output layer when it is a plain ``nn.Linear``, frozen unless no gradient is needed
    (``needs_grad`` false: scoring without autograd), else None: project as usual."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    trained = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    return None if trained and needs_grad else head


@contextmanager
def per_token_nll_head(head: nn.Linear, targets: torch.Tensor) -> Iterator[None]:
    """While active, ``head`` maps its [N, H] input to the per-row NLL [N] of ``targets`` (`linear_nll`)
    instead of [N, V] logits. Its module hooks (distributed wrappers) still run around the call."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2:
            raise RuntimeError(f"the fused output layer expects the scored rows [N, H], got {tuple(hidden.shape)}")
        return linear_nll(hidden, head.weight, head.bias, targets)

    head.forward = forward  # an instance attribute shadows the class's forward; removed on exit
    try:
        yield
    finally:
        del head.forward


@torch.no_grad()
def head_output_is_logits(model: nn.Module, head: nn.Module) -> bool:
    """Whether ``model``'s returned logits are its output layer's result, untouched (no soft-capping or
    scaling after it, as Gemma 2 or Cohere apply): only then may the layer return something else."""
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _a, out: seen.append(out))
    was_training = model.training
    model.eval()
    try:
        emb = model.get_input_embeddings()
        ids = torch.arange(1, 5, device=emb.weight.device).remainder(emb.num_embeddings)[None]
        with torch.autocast(ids.device.type, enabled=False):
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
        model.train(was_training)
    return len(seen) == 1 and seen[0].shape == logits.shape and torch.equal(seen[0], logits)


class FusedHeads:
    """Which output layers run fused with the loss: a plain linear layer (`fusable_head`; frozen, unless
    autograd is off, as when reference log-probs are precomputed, so that those take the same path as the
    policy's) whose output the model returns unchanged (`head_output_is_logits`, checked once per model
    object); never when ``enabled`` (``train.chunked_cross_entropy``) is false. Objectives call it with each
    model they score (the policy, a reference)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._plain: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def __call__(self, model: nn.Module, *, needs_grad: bool | None = None) -> nn.Linear | None:
        """``model``'s output layer when it runs fused with the loss, else None; ``needs_grad``: whether the
        caller will backpropagate (default: whether autograd is on now)."""
        if needs_grad is None:
            needs_grad = torch.is_grad_enabled()
        head = fusable_head(model, needs_grad=needs_grad) if self.enabled else None
        if head is None:
            return None
        if model not in self._plain:
            self._plain[model] = head_output_is_logits(model, head)
        return head if self._plain[model] else None
