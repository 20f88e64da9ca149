"""``MethodRuntime.reference``: a context in which the model computes as the untouched base (DPO/KTO/PPO
reference models, distillation from the base).

For every registered method on a tiny-bert classifier (and a tiny-gpt2 causal LM for every method that
takes one): record the base logits, apply the method, make the reference (once, before training), then
move every trainable parameter far; inside ``with ref() as m`` the logits are the base's (1e-5), after it
the trained logits are back bit for bit, with the same train/eval and ``requires_grad`` flags. Also: an
exception inside the context restores the trained model, and a policy graph built before entering the
context still back-propagates the same gradients after it (what DPO does).

qlora's base is the quantised model it trains on (``apply`` quantises the backbone), so its reference is
compared with the logits right after ``apply``, whose LoRA update is zero; every other method is compared
with the model before ``apply`` (prefix/prompt: the base without virtual tokens).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from tuneforge.config import load_config
from tuneforge.methods import METHODS, MethodContext, get_method
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names

L = 7  # tokens per row
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

# (method, model, kind): tiny-bert classification for all; tiny-gpt2 causal LM for all that take an LM
# (frozen trains a task head only, and a causal LM's head is the pretrained LM head: refused by design;
# qat quantises nn.Linear layers, which GPT-2's Conv1D are not: tiny-llama instead).
LM_MODEL = {"qat": "tiny-llama"}
CASES = [(m, "tiny-bert", "cls") for m in sorted(METHODS)] + [
    (m, LM_MODEL.get(m, "tiny-gpt2"), "lm") for m in sorted(METHODS) if m != "frozen"
]


def _fresh(model: str, method: str, kind: str) -> tuple[nn.Module, object, MethodContext]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(model)
    torch.manual_seed(0)
    if kind == "cls":
        m, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, output_loading_info=True)
        head = head_parameter_names(m, info["missing_keys"])
    else:
        m, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        head = set(info["missing_keys"])  # an LM head is pretrained: only weights the checkpoint lacked
    if m.config.pad_token_id is None:
        m.config.pad_token_id = AutoTokenizer.from_pretrained(path).eos_token_id
    run = load_config(None, [f"model={model}", f"method={method}"])
    return m, run, MethodContext(head, 2)


def _batch(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (3, L), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    return out[:, -L:] if out.dim() == 3 else out  # causal LM with a soft prompt: drop the virtual positions


def _setup(method: str, model: str, kind: str):
    if method == "qlora" and not HAS_BNB:
        pytest.skip("qlora needs bitsandbytes")
    m, run, ctx = _fresh(model, method, kind)
    batch = _batch(m)
    base = _logits(m.eval(), batch)
    runtime = get_method(method).runtime()
    torch.manual_seed(1)
    m = runtime.apply(m, run, ctx)
    m.eval()
    applied = _logits(m, batch)
    assert runtime.reference is not None, f"method '{method}' has no reference"
    ref = runtime.reference(m)  # once, right after apply (before training)
    expected = applied if method == "qlora" else base
    return m, ref, batch, expected


def _perturb(model: nn.Module, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


@pytest.mark.parametrize(("method", "model", "kind"), CASES, ids=[f"{m}-{x}" for m, x, _ in CASES])
def test_reference_computes_as_the_base(method: str, model: str, kind: str) -> None:
    m, ref, batch, expected = _setup(method, model, kind)
    _perturb(m)
    trained = _logits(m, batch)
    assert (trained - expected).abs().max() > 1e-2, "the perturbation did not change the model"
    m.train()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}

    with ref() as r:
        assert not r.training, "a reference computes in eval mode"
        inside = _logits(r, batch)
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=0)

    assert m.training, "the model's train mode is restored"
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    torch.testing.assert_close(_logits(m.eval(), batch), trained, atol=0, rtol=0)

    with ref() as r:  # a reference is reusable (one per training run, entered every step)
        torch.testing.assert_close(_logits(r, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_reference_restores_on_exception(method: str) -> None:
    m, ref, batch, _ = _setup(method, "tiny-bert", "cls")
    _perturb(m)
    trained = _logits(m, batch)
    with pytest.raises(RuntimeError, match="boom"), ref():
        raise RuntimeError("boom")
    torch.testing.assert_close(_logits(m.eval(), batch), trained, atol=0, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_policy_graph_survives_the_reference(method: str) -> None:
    """DPO order: policy forward (graph kept), reference forward, then backward: same gradients as without."""
    m, ref, batch, _ = _setup(method, "tiny-bert", "cls")
    _perturb(m, 0.1)
    m.train()
    for p in m.parameters():  # dropout off, so both passes compute the same thing
        p.grad = None
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0

    def grads(with_reference: bool) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        loss = m(**batch).logits.float().pow(2).mean()
        if with_reference:
            with torch.no_grad(), ref() as r:
                r(**batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert plain
    with_ref = grads(True)
    assert plain.keys() == with_ref.keys()
    for name in plain:
        torch.testing.assert_close(with_ref[name], plain[name], atol=0, rtol=0, msg=name)


def test_frozen_reference_swaps_only_the_head() -> None:
    m, ref, batch, expected = _setup("frozen", "tiny-bert", "cls")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("bert.encoder.") for n in trainable)
    _perturb(m)
    with ref() as r:
        assert r is m  # no copy
        torch.testing.assert_close(_logits(r, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["full", "partial"])
def test_copy_reference_is_frozen_and_separate(method: str) -> None:
    m, ref, _, _ = _setup(method, "tiny-bert", "cls")
    with ref() as r:
        assert r is not m
        assert not any(p.requires_grad for p in r.parameters())
        assert not {id(p) for p in r.parameters()} & {id(p) for p in m.parameters()}
