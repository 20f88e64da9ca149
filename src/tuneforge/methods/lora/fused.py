"""LoRA linear layers in one autograd node on a CPU (bf16 autocast or fp32): fewer passes over the activations.

Why: peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate ops. Under autocast on a
CPU, each LoRA layer then casts its input to fp32 and back to bf16, builds an fp32 dropout mask, multiplies
the [tokens, out] LoRA output by ``scaling`` and adds it to the base output, and the backward mirrors each
of these. On SmolLM2-135M LoRA SFT (every linear layer adapted) those passes over [tokens, 576 | 1536]
tensors were a quarter of the step (`benchmarks/README.md`): the machine streams them from memory.

What (the same LoRA, Hu et al. 2021): with ``m`` the dropout keep mask (0/1), ``c = 1 / (1 - p)`` and ``s``
the LoRA scaling,

    z = (bf16(x) * m) @ A^T            (exact in bf16: m is 0 or 1)
    y = bf16(x) @ W^T [+ b]  +  (c s z) @ B^T      (the second term added inside the matmul)

so ``c`` and ``s`` scale the [tokens, r] tensor instead of [tokens, in] and [tokens, out] ones. The backward
is written out (module `_FusedLora`).

The dropout, two ways. Up to ``p = 0.15`` (`SPARSE_DROPOUT_MAX_P`; LoRA's usual 0.05 and 0.1) the dropped
elements are drawn as indices (`engine.fast_dropout.drop_positions`: ~``n p`` draws instead of a mask over all
``n``), the forward computes ``z = x @ A^T - D @ A^T`` with ``D`` the dropped elements of ``x`` as a sparse
[tokens, in] matrix (a few % of the entries; the subtraction removes exactly what the dense product added, to
float rounding), and the backward zeroes the input gradient and rebuilds the masked input at those indices:
no mask is drawn over, multiplied into or saved for every element of the [tokens, in] input (SmolLM2-135M
LoRA SFT in fp32: 250 -> 280 tokens/s, peak RSS 6.3 -> 5.1 GB, `benchmarks/README.md`). Above 0.15 the
mask is `engine.fast_dropout`'s ``keep_mask`` and the masked input is saved, as peft with
``train.fast_dropout`` draws it. Either way each element is dropped independently with probability ``p``
(Srivastava et al. 2014); numbers equal peft's with the same dropped elements up to bf16 rounding
(`tests/unit/test_lora_fused.py`).

In fp32 (no autocast: ``precision: auto`` on a CPU where bf16 matmuls are not faster, `engine.runtime`) the
same node runs with every cast a no-op: it still saves the [tokens, out] scaling and addition passes and
their backward (SmolLM2-135M LoRA SFT in fp32, `benchmarks/README.md`); the numbers equal peft's to fp32
rounding (the scalings are applied to ``z`` instead of the input and the output).

When: CPU, bf16 autocast or fp32 inputs and weights, one active vanilla LoRA adapter (no DoRA or other
variant, no LoRA bias) on an ``nn.Linear`` whose weights are frozen, dropout off or `FastDropout`. Anything
else (GPU, fp16, merged, several adapters, ``train.fast_dropout: false``) runs peft's own forward unchanged.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from tuneforge.engine.fast_dropout import FastDropout, drop_positions, keep_mask

__all__ = ["SPARSE_DROPOUT_MAX_P", "FusedLoraLinear", "use_fused_lora"]

SPARSE_DROPOUT_MAX_P = 0.15  # up to this dropout the dropped elements are handled by index (module doc)


class _LastCast(threading.local):
    """The bf16 copy of the last input cast (per thread): q/k/v and gate/up read the same hidden states, so
    the first of them casts and the others reuse it (valid while it is the same tensor, unmodified)."""

    source: weakref.ref | None = None
    version = -1
    value: torch.Tensor | None = None

    def get(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if x.is_inference():  # no version counter to tell an in-place change: cast every time
            return x.to(dtype)
        value = self.value
        if (self.source is None or self.source() is not x or self.version != x._version
                or value is None or value.dtype != dtype):
            value = x.detach().to(dtype)
            self.source, self.version, self.value = weakref.ref(x), x._version, value
        return value


_LAST_CAST = _LastCast()


def _dropped(flat: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """The dropped elements of ``flat`` [T, in] as an fp32 CSR matrix (``drops``: sorted flat indices)."""
    t, n_in = flat.shape
    crow = torch.searchsorted(drops, torch.arange(0, (t + 1) * n_in, n_in))
    vals = flat.reshape(-1).index_select(0, drops).float()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, drops % n_in, vals, (t, n_in))


class _FusedLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, p: float, dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            xb = _LAST_CAST.get(x, dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            flat = xb.reshape(-1, xb.shape[-1])
            mask = drops = None
            if 0 < p <= SPARSE_DROPOUT_MAX_P:  # z = x A^T minus the dropped elements' share (see module doc)
                drops = drop_positions(flat.numel(), p)
            elif p > 0:
                mask = keep_mask(flat, p)
            xin = flat if mask is None else flat * mask
            z = (xin @ a.t()).float()  # [T, r]
            if drops is not None and drops.numel():
                z.sub_(_dropped(flat, drops) @ a.float().t())
            zs = (z * (scale / (1.0 - p))).to(dtype)
            y = torch.mm(flat, w.t()) if bias is None else torch.addmm(bias.to(dtype), flat, w.t())
            y.addmm_(zs, b.t())
        ctx.save_for_backward(w, a, b, xin, zs, mask, drops)
        ctx.scale, ctx.p, ctx.x_dtype = scale, p, x.dtype
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w, a, b, xin, zs, mask, drops = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
            grad_b = (g.t() @ zs).float() if ctx.needs_input_grad[4] else None
            gz = ((g @ b).float() * (ctx.scale / (1.0 - ctx.p))).to(w.dtype)  # d loss / d z, [T, r]
            grad_a = None
            if ctx.needs_input_grad[3]:
                if drops is not None:  # the masked input, rebuilt: a copy and a fill at the dropped indices
                    xin = xin.clone()
                    xin.view(-1).index_fill_(0, drops, 0.0)
                grad_a = (gz.t() @ xin).float()
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = gz @ a
                if mask is not None:
                    grad_x.mul_(mask)
                elif drops is not None:
                    grad_x.view(-1).index_fill_(0, drops, 0.0)
                grad_x = grad_x.addmm_(g, w).view(*grad_y.shape[:-1], w.shape[1]).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


class FusedLoraLinear:
    """Mixed into peft's ``lora.Linear`` by `use_fused_lora`: `_FusedLora` when it applies, else peft's forward."""

    def _fused_parts(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[Any, ...] | None:
        if (args or kwargs or x.device.type != "cpu" or self.disable_adapters or self.merged
                or len(self.active_adapters) != 1):
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if name not in self.lora_A or name in self.lora_variant or type(base) is not nn.Linear:
            return None
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        elif x.dtype == base.weight.dtype == torch.float32:
            dtype = torch.float32
        else:
            return None
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if lora_a.bias is not None or lora_b.bias is not None:
            return None
        if type(dropout) is nn.Identity or not dropout.training or dropout.p == 0:
            p = 0.0
        elif type(dropout) is FastDropout and 0 < dropout.p < 1:
            p = float(dropout.p)
        else:
            return None
        if lora_a.weight.dtype != base.weight.dtype or lora_b.weight.dtype != base.weight.dtype:
            return None
        return base, lora_a.weight, lora_b.weight, float(self.scaling[name]), p, dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        parts = self._fused_parts(x, args, kwargs)
        if parts is None:
            return super().forward(x, *args, **kwargs)
        base, a, b, scale, p, dtype = parts
        return _FusedLora.apply(x, base.weight, base.bias, a, b, scale, p, dtype)


@functools.cache
def _fused_class(lora_linear: type) -> type:
    return type("Linear", (FusedLoraLinear, lora_linear), {"__module__": __name__})


def use_fused_lora(model: nn.Module) -> int:
    """Give every peft ``lora.Linear`` of ``model`` the fused forward (in place, no new weights); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = _fused_class(LoraLinear)
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # exactly peft's lora.Linear (not a subclass such as QAT's)
            module.__class__ = fused
            n += 1
    return n
