"""LoRA layers in one autograd node on CPU under bf16 autocast and in fp32 (`methods.lora.fused`): outputs and
every gradient against peft's own forward with the same dropout masks, where it applies and where it must not."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from tuneforge.engine.fast_dropout import FastDropout, drop_positions, use_fast_dropout
from tuneforge.methods.lora.fused import SPARSE_DROPOUT_MAX_P, FusedLoraLinear, use_fused_lora


class _PositionDropout(nn.Dropout):
    """The reference dropout for p <= SPARSE_DROPOUT_MAX_P: torch's arithmetic (x * mask / (1 - p)) on the
    elements `drop_positions` picks, which is what the fused layer draws."""

    def forward(self, x):
        keep = torch.ones(x.numel(), dtype=x.dtype)
        keep[drop_positions(x.numel(), self.p)] = 0
        return x * keep.view(x.shape) / (1 - self.p)


class _Block(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = nn.Linear(24, 40, bias=bias)
        self.down = nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def _pair(dropout: float, bias: bool = False, **lora):
    torch.manual_seed(0)
    base = _Block(bias)
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the same LoRA A initialisation in both
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"], **lora)
        m = peft.get_peft_model(_Block(bias), cfg)
        m.base_model.model.load_state_dict(base.state_dict(), strict=False)
        torch.manual_seed(1)
        for name, p in m.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give it values so every gradient is exercised
                p.data.normal_(0, 0.5)
        use_fast_dropout(m)
        models.append(m)
    if 0 < dropout <= SPARSE_DROPOUT_MAX_P:  # the fused layer draws dropped indices, not a mask
        for m in models[0].modules():
            if type(m) is FastDropout:
                m.__class__ = _PositionDropout
    return models


def _run(model, x, seed=7, autocast=True):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(xi)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach().float(), xi.grad, grads


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("dropout", "bias"), [(0.0, False), (0.05, False), (0.1, True), (0.3, False)])
def test_fused_lora_matches_peft_with_the_same_masks(dropout: float, bias: bool, autocast: bool) -> None:
    reference, fused = _pair(dropout, bias)
    assert use_fused_lora(fused) == 2
    assert all(isinstance(m, FusedLoraLinear) for m in (fused.base_model.model.up, fused.base_model.model.down))
    x = torch.randn(3, 11, 24)
    y_ref, gx_ref, g_ref = _run(reference, x, autocast=autocast)
    y, gx, g = _run(fused, x, autocast=autocast)
    # bf16: rounding only: the same masks, the scaling applied to [T, r] instead of [T, out], one rounding of
    # base + LoRA instead of two (one bf16 ulp is 2^-8 of a value). Measured: <= 0.6% of the largest output,
    # 0.85% for the input gradient, 0.6% for the LoRA weights' gradients. fp32: the same ops in another order
    # (fp32 rounding, ~1e-7 relative)
    tol = 1.5e-2 if autocast else 1e-5
    scale = float(y_ref.abs().max())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol * scale)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=tol * float(gx_ref.abs().max()))
    assert set(g) == set(g_ref) and all("lora_" in n for n in g)
    for n, ref in g_ref.items():
        torch.testing.assert_close(g[n], ref, rtol=0, atol=tol * float(ref.abs().max()), msg=n)
    # the dropout really dropped: a different random stream changes the gradients by far more than rounding
    _, _, g_other = _run(reference, x, seed=8, autocast=autocast)
    if dropout:
        assert any(float((g_other[n] - g_ref[n]).abs().max()) > 0.1 * float(g_ref[n].abs().max()) for n in g_ref)


def test_fused_lora_steps_aside_where_it_does_not_apply(monkeypatch) -> None:
    reference, fused = _pair(0.3)  # above SPARSE_DROPOUT_MAX_P: both models draw FastDropout's masks
    use_fused_lora(fused)
    x = torch.randn(2, 5, 24)
    calls = []
    real = torch.autograd.Function.apply

    def spy(cls, *a):
        calls.append(cls.__name__)
        return real.__func__(cls, *a)

    from tuneforge.methods.lora import fused as module

    monkeypatch.setattr(module._FusedLora, "apply", classmethod(spy))
    for autocast in (False, True):  # bf16 autocast and fp32 both fuse
        calls.clear()
        _run(fused, x, autocast=autocast)
        assert len(calls) == 2
    calls.clear()  # fp64 (neither): peft's path, exactly
    y_ref, _, g_ref = _run(reference.double(), x.double(), autocast=False)
    y, _, g = _run(fused.double(), x.double(), autocast=False)
    assert calls == [] and torch.equal(y, y_ref) and all(torch.equal(g[n], g_ref[n]) for n in g_ref)
    fused.float()
    with fused.disable_adapter():
        _run(fused, x)
    assert calls == []
    fused.merge_adapter()  # merged: the base layer alone
    _run(fused, x)
    assert calls == []
    fused.unmerge_adapter()
    for m in fused.modules():  # torch's own dropout (train.fast_dropout: false): peft's path
        if type(m).__name__ == "FastDropout":
            m.__class__ = nn.Dropout
    _run(fused, x)
    assert calls == []


def test_dora_and_state_dicts_are_untouched() -> None:
    ref, fused = _pair(0.0, use_dora=True)
    assert use_fused_lora(fused) == 2  # the class is swapped, but DoRA is a peft variant: peft's forward runs
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(_run(fused, x)[0], _run(ref, x)[0])
    plain, swapped = _pair(0.1)
    use_fused_lora(swapped)
    assert list(swapped.state_dict()) == list(plain.state_dict())


def test_layers_reading_the_same_input_share_its_cast_until_it_changes() -> None:
    from tuneforge.methods.lora.fused import _LAST_CAST

    x = torch.randn(4, 6)
    first = _LAST_CAST.get(x, torch.bfloat16)
    assert _LAST_CAST.get(x, torch.bfloat16) is first  # the second reader of x: no new cast
    assert _LAST_CAST.get(x.clone(), torch.bfloat16) is not first  # another tensor
    x.mul_(2)  # modified in place: cast again
    assert torch.equal(_LAST_CAST.get(x, torch.bfloat16), (x).to(torch.bfloat16))
    bf = x.to(torch.bfloat16)
    assert _LAST_CAST.get(bf, torch.bfloat16) is bf
    with torch.inference_mode():  # inference tensors have no version counter: cast, do not cache
        xi = torch.randn(4, 6)
        assert torch.equal(_LAST_CAST.get(xi, torch.bfloat16), xi.to(torch.bfloat16))

    class QK(nn.Module):  # two adapted layers on one input, as q_proj and k_proj
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(24, 8), nn.Linear(24, 8)

        def forward(self, x):
            return self.q(x) * self.k(x)

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = peft.get_peft_model(QK(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k"]))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
        models.append(m)
    use_fused_lora(models[1])
    xin = torch.randn(3, 5, 24)
    y_ref, gx_ref, g_ref = _run(models[0], xin)
    y, gx, g = _run(models[1], xin)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1.5e-2 * float(y_ref.abs().max()))
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1.5e-2 * float(gx_ref.abs().max()))
    for n, ref in g_ref.items():
        torch.testing.assert_close(g[n], ref, rtol=0, atol=1.5e-2 * float(ref.abs().max()), msg=n)
