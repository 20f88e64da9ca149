"""Packing for causal LMs: block/row arithmetic, and packed rows scoring exactly like documents run alone
(per-token losses vs separate forwards, our loss vs transformers' own)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.config import load_config
from tuneforge.data.packing import lm_batches, pack_blocks, pack_documents, packed_grouping
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError
from tuneforge.eval.lm import perplexity, shifted_nll
from tuneforge.models import resolve_model
from tuneforge.objectives.causal_lm import check_packed_attention, evaluate_lm, forward_nll, lm_loss
from tuneforge.objectives.sft import SftObjective


def _model(name: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32).eval()


def test_pack_blocks_cuts_the_concatenated_stream() -> None:
    docs = [[1, 2, 3, 9], [4, 5, 9], [6, 7, 8, 10, 11, 9]]  # 13 tokens, EOS = 9 already appended
    out = pack_blocks(docs, 5)
    assert out["input_ids"] == [[1, 2, 3, 9, 4], [5, 9, 6, 7, 8], [10, 11, 9]]
    assert out["labels"] == out["input_ids"]
    assert pack_blocks([[1, 2, 3, 4, 5, 6]], 5)["input_ids"] == [[1, 2, 3, 4, 5]]  # a 1-token tail predicts nothing


def test_pack_documents_first_fit_decreasing_with_restarting_positions() -> None:
    ids = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    out = pack_documents(ids, ids, 8)
    # lengths 3, 5, 2, 4 -> decreasing 5, 4, 3, 2: [5+3], [4+2]
    assert out["input_ids"] == [[4, 5, 6, 7, 8, 1, 2, 3], [11, 12, 13, 14, 9, 10]]
    assert out["position_ids"] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    # the first token of each document is never a target (it would be predicted from the previous document)
    assert out["labels"] == [[-100, 5, 6, 7, 8, -100, 2, 3], [-100, 12, 13, 14, -100, 10]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_documents([[1] * 9], [[1] * 9], 8)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_packed_rows_score_like_documents_run_alone(name: str) -> None:
    model = _model(name)
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 900, (n,), generator=gen).tolist() for n in (7, 12, 5, 9, 3, 11)]
    cols = pack_documents(docs, docs, 24)
    assert len(cols["input_ids"]) < len(docs)  # really packed
    data = lm_batches(cols, 0, group_by_length=False)
    batch = data.collate(range(len(data)))  # rows of different lengths: right padding too
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        # per-token NLL of each packed row, keyed by (document, position)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        packed: dict[tuple, float] = {}
        for r, row in enumerate(cols["input_ids"]):
            pos = cols["position_ids"][r]
            for t in range(1, len(row)):
                if pos[t] > 0:
                    start = t - pos[t]
                    key = (tuple(row[start : start + 2]), pos[t])
                    packed[key] = float(-logp[r, t - 1, row[t]])
        alone: dict[tuple, float] = {}
        for d in docs:
            lp = torch.log_softmax(model(input_ids=torch.tensor([d]), use_cache=False).logits[0, :-1].float(), -1)
            for t in range(1, len(d)):
                alone[(tuple(d[:2]), t)] = float(-lp[t - 1, d[t]])
    assert packed.keys() == alone.keys()
    np.testing.assert_allclose([packed[k] for k in alone], list(alone.values()), atol=1e-5)

    # and the token-weighted evaluation of the packed split equals the documents' total NLL
    ev = evaluate_lm(model, data, batch_size=2, runtime=Runtime.cpu())
    total = sum(alone.values())
    assert ev["tokens"] == len(alone)
    assert ev["loss"] == pytest.approx(total / len(alone), abs=1e-5)
    assert ev["perplexity"] == pytest.approx(math.exp(total / len(alone)), rel=1e-5)


def _null():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_lm_loss_equals_transformers_loss(name: str) -> None:
    model = _model(name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 900, (3, 10), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    with torch.no_grad():
        ours = lm_loss(model, batch)
        ref = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        total, count = forward_nll(model, batch)
    assert float(ours) == pytest.approx(float(ref), abs=1e-6)
    assert int(count) == 3 * 9 - 3 - 3  # 9 predictions per row, minus prompt targets (3) and padding (3)
    assert float(total) == pytest.approx(float(ref) * int(count), rel=1e-6)


def test_shifted_nll_by_hand_and_perplexity() -> None:
    # vocab 2, logits make p(token 1) = 0.75 at t=0 -> target labels[1] = 1 costs -log 0.75
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    total, n = shifted_nll(logits, torch.tensor([[0, 1]]))
    assert int(n) == 1
    assert float(total) == pytest.approx(-math.log(0.75))
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert perplexity(1e6) == math.inf


def test_packing_check_accepts_llama_and_refuses_a_model_that_ignores_positions() -> None:
    check_packed_attention(_model("tiny-llama"), "tiny-llama")

    class Leaky(torch.nn.Module):  # attends to everything before it, whatever the position ids say
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, position_ids=None, use_cache=None):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.emb(input_ids).cumsum(1))

    with pytest.raises(ConfigError, match=r"task\.packing"):
        check_packed_attention(Leaky(), "leaky")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_output_layer_on_scored_positions_only_gives_the_same_loss_and_gradients(name: str) -> None:
    """forward_nll projects only the positions that predict a supervised token; loss and gradients must
    equal the full-logits computation (and the hook must really have shrunk the logits)."""
    model = _model(name)  # eval mode: no dropout, so both forwards are deterministic
    torch.manual_seed(0)
    ids = torch.randint(3, 900, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 9:] = -100  # padding
    batch = {"input_ids": ids, "labels": labels}
    seen: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(tuple(out.shape)))
    total, count = forward_nll(model, batch)
    hook.remove()
    assert seen == [(int(count), model.config.vocab_size)]  # only the scored positions: 7 + (7 - 3) + 7
    (total / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_total, ref_count = shifted_nll(model(input_ids=ids, use_cache=False).logits, labels)
    (ref_total / ref_count).backward()
    assert int(count) == int(ref_count) == 18
    assert float(total.detach()) == pytest.approx(float(ref_total.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_packed_rows_are_not_grouped_by_length(tmp_path: Path) -> None:
    """Grouping only cuts padding; packed rows have none, so their batches stay a plain shuffle."""
    assert packed_grouping(True, "none") and not packed_grouping(False, "none")
    assert not packed_grouping(True, "documents") and not packed_grouping(True, "blocks")
    rows = [{"instruction": f"say {w}", "input": "", "output": f"{w} " * (1 + i % 5)} for i, w in enumerate("abcdefgh" * 3)]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    for packing, grouped in (("documents", False), ("none", True)):
        run = load_config(None, ["model=tiny-llama", "task=sft", f"task.packing={packing}", f"data.train={path}",
                                 "data.max_length=64"])
        objective = SftObjective(run)
        data = objective.load_data(run)
        tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
        assert objective.prepare(data.splits["train"], tok, run).group_by_length is grouped
