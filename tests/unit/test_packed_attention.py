"""``train.packed_attention``: attention once per packed document (`engine.packed_attention`) against the masked
call transformers makes for packed rows: the plan read from ``position_ids``, equal outputs and gradients
(fp32 and bf16), every case it leaves to transformers, and a packed SFT run with the same loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.config import load_config
from tuneforge.data.packing import lm_batches, pack_documents
from tuneforge.engine import packed_attention
from tuneforge.engine.fast_attention import cpu_training_attention
from tuneforge.engine.packed_attention import document_plan
from tuneforge.models import resolve_model
from tuneforge.pipeline import train


def _block_causal(lengths: list[int]) -> torch.Tensor:
    n = sum(lengths)
    mask = torch.zeros(n, n, dtype=torch.bool)
    s = 0
    for length in lengths:
        mask[s : s + length, s : s + length] = torch.ones(length, length, dtype=torch.bool).tril()
        s += length
    return mask


def test_the_plan_is_the_documents_of_the_position_ids() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 1]])
    mask = torch.stack([_block_causal([3, 2, 1, 1, 1]), _block_causal([6, 2])])[:, None]
    # one-token documents (padding) in a row are one piece, whose outputs are their values
    assert document_plan(pos, mask) == [(3, False), (2, False), (3, True), (6, False), (2, False)]
    assert document_plan(pos, mask.float()) is None  # an additive mask: not what transformers builds here
    assert document_plan(pos, mask[:1]) is None  # shapes differ
    padded = mask.clone()
    padded[1, 0, :, 7] = False  # a padding mask on top: not the per-document mask of these positions
    assert document_plan(pos, padded) is None
    whole = torch.ones(8, 8, dtype=torch.bool).tril()[None, None].expand(2, 1, 8, 8)
    assert document_plan(pos, whole) is None  # one causal row over several documents
    assert document_plan(torch.arange(8)[None], whole[:1]) == [(8, False)]


@pytest.fixture
def hits(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each call of `sdpa_by_document` by the installed attention function: True when it took the call."""
    seen: list[bool] = []
    real = packed_attention.sdpa_by_document

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out is not None)
        return out

    monkeypatch.setattr("tuneforge.engine.fast_attention.sdpa_by_document", spy)
    return seen


def _packed_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 900, (n,), generator=gen).tolist() for n in (7, 12, 5, 9, 3, 11, 2, 6)]
    cols = pack_documents(docs, docs, 24)
    data = lm_batches(cols, 0, group_by_length=False)
    batch = data.collate(range(len(data)))
    assert (batch["position_ids"] == 0).sum() > len(docs)  # right padding too (position 0, one-token pieces)
    return batch


def _forward_backward(model, batch, *, by_document: bool, autocast: bool = False, calls: list | None = None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), cpu_training_attention(False, by_document):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    real = batch["labels"] != -100
    (logits.float()[real] * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float()[real], grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_by_document_equals_the_masked_call(autocast: bool, hits: list[bool]) -> None:
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32,
                                                 attn_implementation="sdpa").train()  # grouped heads: 4 / 2
    batch = _packed_batch()
    ref, g_ref = _forward_backward(model, batch, by_document=False, autocast=autocast)
    assert hits == []
    out, g = _forward_backward(model, batch, by_document=True, autocast=autocast)
    assert hits == [True, True]  # both layers, per document
    # fp32: the same sums in other blocks (~1e-7 relative); bf16: rounding of the attention outputs
    tol = 3e-2 if autocast else 1e-5
    torch.testing.assert_close(out, ref, rtol=0, atol=tol * float(ref.abs().max()))
    assert set(g) == set(g_ref)
    for name, r in g_ref.items():
        torch.testing.assert_close(g[name], r, rtol=0, atol=tol * float(r.abs().max()), msg=name)


def test_cases_left_to_transformers() -> None:
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32,
                                                 attn_implementation="sdpa").train()
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 8)
    kv = torch.randn(1, 2, 8, 8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    mask = _block_causal([4, 4])[None, None]
    assert packed_attention.sdpa_by_document(attn, q, kv, kv, mask, position_ids=pos) is not None
    assert packed_attention.sdpa_by_document(attn, q, kv, kv, mask) is None  # no position_ids
    assert packed_attention.sdpa_by_document(attn, q, kv, kv, mask, dropout=0.1, position_ids=pos) is None
    assert packed_attention.sdpa_by_document(attn, q, kv, kv, None, position_ids=pos) is None  # no mask: not packed
    assert packed_attention.sdpa_by_document(attn, q, kv, kv, mask, position_ids=pos, softcap=30.0) is None
    assert packed_attention.sdpa_by_document(attn, q, kv, kv, mask, position_ids=pos, is_causal=False) is None
    longer = torch.randn(1, 2, 12, 8)  # a cache before the queries
    assert packed_attention.sdpa_by_document(attn, q, longer, longer, mask, position_ids=pos) is None


def _sft_losses(tmp_path: Path, packed_attention_on: bool, *extra: str) -> list[float]:
    rows = [{"instruction": f"repeat {w} {i}", "input": "", "output": f"{w} " * (2 + i % 7)}
            for i, w in enumerate("abcdefghij" * 4)]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / f"run-{packed_attention_on}-{len(extra)}"
    run = load_config(None, ["model=tiny-llama", "task=sft", "task.packing=documents", f"data.train={path}",
                             "data.max_length=96", "method.name=lora", "train.max_steps=6", "train.batch_size=4",
                             "train.lr=5e-3", "train.tensorboard=false", "train.seed=3", "train.log_steps=1",
                             f"train.packed_attention={str(packed_attention_on).lower()}", f"output_dir={out}", *extra])
    train(run, quiet=True)
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train" and r.get("loss") is not None]


def test_a_packed_sft_run_learns_the_same_with_and_without(tmp_path: Path, hits: list[bool]) -> None:
    on = _sft_losses(tmp_path, True)
    assert hits.count(True) >= 6 * 2  # every training forward, both layers (one-off model checks may not)
    hits.clear()
    off = _sft_losses(tmp_path, False)
    assert hits == []
    assert len(on) == len(off) == 6
    assert on == pytest.approx(off, abs=1e-4)  # the same random stream: only float rounding differs
    assert on[-1] < on[0]


def test_a_compiled_packed_run_keeps_attention_per_document(tmp_path: Path, hits: list[bool],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile=blocks`` with packed rows: the per-document attention runs eagerly between the compiled
    parts (traced, its plan cache failed dynamo's guards), and the loss curve is the eager run's. Compiled with
    ``aot_eager`` (graph capture and AOT autograd without inductor's code generation), as in test_compile.py."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compile_module(self, *a, **{**k, "backend": "aot_eager"}))
    compiled = _sft_losses(tmp_path, True, "train.compile=blocks")
    assert hits.count(True) >= 6 * 2
    eager = _sft_losses(tmp_path, True)
    assert compiled == pytest.approx(eager, abs=1e-4)
