"""``train.first_token_last_layer`` (`objectives.first_token`): the last encoder layer computes position 0 only.

Oracle: the same model without the patch (transformers' own forward). With dropout off the logits and every
parameter's gradient equal the full computation's to float rounding, for BERT and RoBERTa, sdpa and eager
attention, with padding; outside the context the layer is the plain one; models whose head reads other
positions (decoders, token classification) are left alone; a classification run with it trains and predicts
like a run without it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from tuneforge.config import load_config
from tuneforge.models import resolve_model
from tuneforge.objectives.first_token import first_token_only, use_first_token_last_layer
from tuneforge.pipeline import train


def _model(arch: str, attn: str, cls: type = AutoModelForSequenceClassification) -> nn.Module:
    torch.manual_seed(0)
    return cls.from_pretrained(resolve_model(f"tiny-{arch}"), num_labels=3, attn_implementation=attn)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 0])}


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_and_gradients_equal_the_full_layer(arch: str, attn: str) -> None:
    ref = _model(arch, attn)
    fast = copy.deepcopy(ref)
    assert use_first_token_last_layer(fast)
    for m in (ref, fast):  # training mode (the patched path's dropout branch) with every dropout at 0
        m.train()
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0  # the attention-probability dropout reads its module's p too
    batch = _batch(ref.config.vocab_size)
    out_ref = ref(**batch)
    with first_token_only():
        out_fast = fast(**batch)
    torch.testing.assert_close(out_fast.logits, out_ref.logits, atol=1e-6, rtol=1e-5)
    out_ref.loss.backward()
    out_fast.loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in fast.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_only_inside_the_context_and_only_the_last_layer() -> None:
    model = _model("bert", "sdpa").eval()
    assert use_first_token_last_layer(model) and use_first_token_last_layer(model)  # idempotent
    batch = {k: v for k, v in _batch(model.config.vocab_size).items() if k != "labels"}
    with torch.no_grad():
        full = model.bert(**batch).last_hidden_state
        with first_token_only():
            first = model.bert(**batch).last_hidden_state
            off = None
            with first_token_only(False):
                off = model.bert(**batch).last_hidden_state
    assert full.shape == off.shape == (4, 11, model.config.hidden_size) and first.shape == (4, 1, model.config.hidden_size)
    torch.testing.assert_close(first[:, 0], full[:, 0], atol=1e-6, rtol=1e-5)
    patched = [type(m).__module__ == "tuneforge.objectives.first_token" for m in model.bert.encoder.layer]
    assert patched == [False] * (len(patched) - 1) + [True]


@pytest.mark.parametrize(("arch", "cls"), [("llama", AutoModelForSequenceClassification),
                                           ("gpt2", AutoModelForSequenceClassification),
                                           ("bert", AutoModelForTokenClassification)])
def test_heads_reading_other_positions_are_left_alone(arch: str, cls: type) -> None:
    model = _model(arch, "sdpa", cls)
    assert not use_first_token_last_layer(model)
    assert all(type(m).__module__ != "tuneforge.objectives.first_token" for m in model.modules())


def test_a_run_with_and_without_it(tmp_path: Path, tiny_csv: Callable[..., Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny-bert classification in fp32: with the option (the default) the fast path runs in training and
    evaluation, and the run learns the task as well as a run without it (their dropout streams differ)."""
    import tuneforge.objectives.first_token as ft
    from tuneforge.track import read_metrics

    calls = [0]
    real = ft._attention

    def counted(sa: nn.Module):
        calls[0] += 1
        return real(sa)

    monkeypatch.setattr(ft, "_attention", counted)
    data = tiny_csv(rows=[("good great fun", "pos"), ("bad awful boring", "neg")] * 30)
    runs, used, curves = {}, {}, {}
    for flag in ("true", "false"):
        cfg = load_config(None, ["model=tiny-bert", f"data.train={data}", "train.batch_size=8", "train.max_steps=40",
                                 "train.lr=1e-2", "train.precision=fp32", "train.tensorboard=false", "train.log_steps=1",
                                 f"train.first_token_last_layer={flag}", f"output_dir={tmp_path / flag}"])
        calls[0] = 0
        res = train(cfg, overwrite=True, quiet=True)
        runs[flag], used[flag] = res.metrics["splits"]["validation"], calls[0]
        curves[flag] = [r["loss"] for r in read_metrics(res.run_dir) if r.get("split") == "train" and "loss" in r]
    assert used["true"] >= 40 and used["false"] == 0  # every training step (and the evaluations) took it
    assert runs["true"]["accuracy"] == runs["false"]["accuracy"] == 1.0
    for flag, losses in curves.items():  # per-step losses carry dropout noise: compare 10-step means
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < first - 0.1, (flag, first, last)
