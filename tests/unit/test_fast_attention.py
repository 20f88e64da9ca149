"""`engine.fast_attention`: sdpa attention with the probability dropout written out on CPU.

Oracles: the attention formula worked in float64 with the same keep mask (drawn again from the same seed with
`fast_dropout.keep_mask`), for padding masks as booleans and as additive floats and for the causal case, with
gradients; transformers' own sdpa function wherever the written-out path does not apply (eval mode, dropout
0, grouped heads); and the registry entry restored after the context, also after an error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tuneforge.engine.fast_attention import cpu_training_attention, sdpa_with_fast_dropout
from tuneforge.engine.fast_dropout import keep_mask

B, H, T, D, P = 3, 2, 7, 8, 0.25


class _Attn(nn.Module):
    is_causal = False


def _qkv(kv_heads: int = H) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, T, D, generator=gen, requires_grad=True) for h in (H, kv_heads, kv_heads)]


def _padding() -> torch.Tensor:
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[1, :, :, 5:] = False
    keep[2, :, :, 3:] = False
    return keep


def _reference(q, k, v, keep_kv: torch.Tensor | None, causal: bool, seed: int) -> torch.Tensor:
    scores = (q.double() @ k.double().transpose(-2, -1)) * D**-0.5
    if keep_kv is not None:
        scores = scores.masked_fill(~keep_kv, float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, -1)
    torch.manual_seed(seed)
    kept = keep_mask(probs.float(), P).double()
    return ((probs * kept / (1 - P)) @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "causal"])
def test_written_out_dropout_equals_the_formula(mask_kind: str) -> None:
    module = _Attn().train()
    module.is_causal = mask_kind == "causal"
    keep = _padding()
    mask = {"bool": keep, "additive": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")), "causal": None}[mask_kind]
    q, k, v = _qkv()
    torch.manual_seed(5)
    out, weights = sdpa_with_fast_dropout(module, q, k, v, mask, dropout=P, scaling=D**-0.5)
    assert weights is None and out.shape == (B, T, H, D)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = _reference(q2, k2, v2, None if mask_kind == "causal" else keep, mask_kind == "causal", seed=5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ref.backward(grad.double())
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad.double(), b.grad.double(), atol=1e-5, rtol=1e-5)


def test_about_p_of_the_probabilities_are_dropped_and_the_rest_scaled() -> None:
    """Uniform attention (q = 0) over one-hot values reads the dropped probabilities back: a share p of them
    is 0, the others 1/T / (1 - p)."""
    n = 32
    q = torch.zeros(16, 4, n, n)
    v = torch.eye(n).expand(16, 4, n, n)
    torch.manual_seed(0)
    out, _ = sdpa_with_fast_dropout(_Attn().train(), q, q, v, None, dropout=0.1, scaling=1.0)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.01
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / n / (1 - 0.1)))


@pytest.mark.parametrize("case", ["eval", "no-dropout", "grouped-heads"])
def test_transformers_own_function_where_it_does_not_apply(case: str) -> None:
    module = _Attn().train() if case != "eval" else _Attn().eval()
    q, k, v = _qkv(kv_heads=1 if case == "grouped-heads" else H)
    if case == "grouped-heads":
        module.num_key_value_groups = H
    p = 0.0 if case == "no-dropout" else P
    torch.manual_seed(3)
    ours, _ = sdpa_with_fast_dropout(module, q, k, v, _padding(), dropout=p if case != "eval" else 0.0, scaling=D**-0.5)
    torch.manual_seed(3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, _padding(), dropout=p if case != "eval" else 0.0, scaling=D**-0.5)
    assert torch.equal(ours, theirs)


def test_the_context_swaps_the_registry_entry_and_puts_it_back() -> None:
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with cpu_training_attention():
        assert ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None) is sdpa_with_fast_dropout
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    with pytest.raises(RuntimeError), cpu_training_attention():
        raise RuntimeError("a failing forward")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    with cpu_training_attention(False):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
