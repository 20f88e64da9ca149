"""The output layer fused with the next-token loss (`objectives.chunked_ce`): per-token NLL and the hidden
states' gradient against ``F.linear`` + ``F.cross_entropy``; the SFT objective using it only where it is
exact (frozen plain head, logits returned untouched), and training the same with it as without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tuneforge.config import load_config
from tuneforge.models import resolve_model
from tuneforge.objectives import chunked_ce
from tuneforge.objectives.causal_lm import TokenNLL, forward_nll, lm_forward
from tuneforge.objectives.chunked_ce import fusable_head, head_output_is_logits, linear_nll
from tuneforge.pipeline import train


def _reference(hidden, weight, bias, targets, weights, autocast):
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        nll = F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="none")
    (nll * weights).sum().backward()
    return nll.detach(), h.grad


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_nll_matches_projection_then_cross_entropy(monkeypatch, autocast: bool, bias: bool) -> None:
    monkeypatch.setitem(chunked_ce._CHUNK_ELEMENTS, "cpu", 7 * 1000)  # 7 rows per chunk: 43 chunks, the last short
    torch.manual_seed(0)
    n, d, v = 300, 32, 1000
    weight, b = torch.randn(v, d) * 0.3, (torch.randn(v) * 0.1 if bias else None)
    hidden, targets, per_token = torch.randn(n, d), torch.randint(0, v, (n,)), torch.rand(n)
    ref_nll, ref_grad = _reference(hidden, weight, b, targets, per_token, autocast)
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        nll = linear_nll(h, weight, b, targets)
    (nll * per_token).sum().backward()
    assert nll.dtype == torch.float32 and h.grad.dtype == torch.float32
    # fp32: the same numbers; bf16: the same bf16 logits, so the same NLL; the gradient rounds
    # softmax - onehot to bf16 before scaling instead of after (one bf16 ulp, 2^-8 relative)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=2e-6)
    tol = (1e-5 if not autocast else 8e-3) * float(ref_grad.abs().max())
    torch.testing.assert_close(h.grad, ref_grad, rtol=0, atol=tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # no gradient rows kept
        torch.testing.assert_close(linear_nll(hidden, weight, b, targets), nll.detach())


def test_linear_nll_of_no_rows_is_empty_and_differentiable() -> None:
    h = torch.randn(0, 4, requires_grad=True)
    nll = linear_nll(h, torch.randn(10, 4), None, torch.zeros(0, dtype=torch.long))
    assert nll.shape == (0,)
    nll.sum().backward()
    assert h.grad.shape == (0, 4)


def test_linear_nll_refuses_a_trainable_layer() -> None:
    w = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        linear_nll(torch.randn(3, 4), w, None, torch.tensor([1, 2, 3]))


def _tiny(name: str = "tiny-llama") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32).eval()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_fused_forward_gives_the_same_loss_logits_and_gradients(name: str, autocast: bool) -> None:
    model = _tiny(name)
    for p in model.get_output_embeddings().parameters():
        p.requires_grad_(False)  # as under LoRA
    head = fusable_head(model)
    assert head is not None and head_output_is_logits(model, head)
    torch.manual_seed(0)
    ids = torch.randint(3, 900, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    batch = {"input_ids": ids, "labels": labels}
    results = []
    for fused in (None, head):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, count = forward_nll(model, batch, fused_head=fused)
        (total / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(total.detach()), grads))
    (plain, plain_grads), (fused_total, fused_grads) = results
    assert fused_total == pytest.approx(plain, rel=1e-6)
    # fp32: equal to rounding (measured 8e-7 of the largest entry). bf16: the head's gradient differs by one
    # bf16 ulp here and there (module docstring), which the bf16 matmuls below carry on: measured <= 1.1%
    bound = 2.5e-2 if autocast else 1e-5
    for n, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[n], g, rtol=0, atol=bound * float(g.abs().max()) + 1e-9, msg=n)
    with torch.no_grad():  # logits on demand (distillation reads them) equal the plain projection
        out = lm_forward(model, batch, fused_head=head)
        assert isinstance(out, TokenNLL)
        torch.testing.assert_close(out.logits, lm_forward(model, batch).logits)
    assert "forward" not in vars(head)  # the per-call override is gone


def test_fusing_is_refused_for_a_trained_head_and_for_post_processed_logits() -> None:
    model = _tiny()
    assert fusable_head(model) is None  # the head trains (full fine-tuning)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    assert fusable_head(model) is head and head_output_is_logits(model, head)
    handle = model.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out.logits / 30.0))
    assert not head_output_is_logits(model, head)  # e.g. Gemma 2's soft-capping after the layer
    handle.remove()


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """One entry per call of `chunked_ce.linear_nll` (the fused path) during the test."""
    seen: list[int] = []
    real = chunked_ce.linear_nll
    monkeypatch.setattr(chunked_ce, "linear_nll", lambda *a: seen.append(1) or real(*a))
    return seen


def test_sft_with_lora_trains_the_same_with_and_without_the_fused_loss(tmp_path: Path, calls: list[int]) -> None:
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
            for w in ("apple", "river", "stone", "cloud", "ember", "field", "glass", "honey") * 3]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    runs, used = {}, {}
    for fused in (True, False):
        run = load_config(None, ["model=tiny-llama", "task=sft", "method=lora", f"data.train={path}",
                                 f"data.validation={path}", "train.max_steps=6", "train.batch_size=4",
                                 "train.lr=5e-3", "train.tensorboard=false", f"train.chunked_cross_entropy={fused}",
                                 f"output_dir={tmp_path / str(fused)}"])
        calls.clear()
        runs[fused] = train(run, overwrite=True, quiet=True).metrics
        used[fused] = len(calls)
    assert used[True] >= 6 and used[False] == 0  # every training step (and the evaluations) ran fused, or none
    assert runs[True]["train"]["final_loss"] == pytest.approx(runs[False]["train"]["final_loss"], abs=2e-3)
    assert runs[True]["eval"]["loss"] == pytest.approx(runs[False]["eval"]["loss"], abs=2e-3)


def test_evaluation_of_a_trained_head_runs_fused_with_the_same_loss(tmp_path: Path, calls: list[int]) -> None:
    """Full fine-tuning trains the output layer (its training loss keeps the plain projection) but evaluation
    takes no gradient, so its held-out loss runs fused: equal to the plain one in fp32."""
    from tuneforge.engine.runtime import Runtime
    from tuneforge.objectives import get_objective

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the {w} is near the {v}" for w in ("cat", "dog", "owl") for v in ("barn", "lake")),
                    encoding="utf-8")
    losses = {}
    for fused in (True, False):
        run = load_config(None, ["model=tiny-gpt2", "task=clm", "method=full", f"data.train={text}",
                                 "train.precision=fp32", f"train.chunked_cross_entropy={fused}"])
        objective = get_objective(run)
        data = objective.load_data(run)
        built = objective.build(run, resolve_model(run.model.name), data)
        batches = objective.prepare(data.splits["train"], built.tokenizer, run)
        assert built.model.get_output_embeddings().weight.requires_grad
        assert objective.fused_head(built.model) is None  # training: the head's gradient needs the projection
        calls.clear()
        runtime = Runtime.for_run(run.train)  # CUDA when present: the model goes where the batches go
        losses[fused] = objective.evaluate(runtime.move(built.model), batches, batch_size=4, runtime=runtime)
        assert bool(calls) is fused
    assert losses[True]["tokens"] == losses[False]["tokens"] > 0
    assert losses[True]["loss"] == pytest.approx(losses[False]["loss"], rel=1e-6)
