"""Fine-tuning methods on tiny models: which parameters train, which stay bit-identical, feature caching,
and the trainable-parameter counts."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tuneforge.config import load_config
from tuneforge.data.batching import TokenBatches
from tuneforge.methods import get_method
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names, param_depth, trainable_summary
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import RunResult, train

PREFIX = {
    "tiny-bert": "bert.",
    "tiny-roberta": "roberta.",
    "tiny-llama": "model.",
    "tiny-gpt2": "transformer.",
}


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


class Snapshot:
    """Captures the model the pipeline trains, right after the method's ``apply``."""

    model: nn.Module
    initial: dict[str, torch.Tensor]
    trainable: tuple[int, int]
    requires_grad: dict[str, bool]


@pytest.fixture()
def snapshot(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Snapshot]:
    def install(method: str) -> Snapshot:
        snap = Snapshot()
        module = importlib.import_module(get_method(method).module)
        real_apply = module.apply

        def apply(model, run, ctx):
            model = real_apply(model, run, ctx)
            snap.model = model
            snap.initial = {k: v.detach().clone() for k, v in model.named_parameters()}
            snap.requires_grad = {k: v.requires_grad for k, v in model.named_parameters()}
            snap.trainable = trainable_summary(model)
            return model

        monkeypatch.setattr(module, "METHOD", dataclasses.replace(module.METHOD, apply=apply))
        return snap

    return install


def _run(
    tmp_path: Path, data: Path, *overrides: str, model: str = "tiny-bert", quiet: bool = True
) -> RunResult:
    cfg = load_config(
        None,
        [
            f"model={model}",
            f"data.train={data}",
            "train.batch_size=8",
            "train.precision=fp32",
            "train.lr=1e-3",
            "train.warmup_steps=0",
            *overrides,
            f"output_dir={tmp_path / 'run'}",
            "train.tensorboard=false",
        ],
    )
    return train(cfg, overwrite=True, quiet=quiet)


def _changed(snap: Snapshot) -> dict[str, bool]:
    final = dict(snap.model.named_parameters())
    return {k: not torch.equal(final[k], v) for k, v in snap.initial.items()}


def _base_weights(model: str) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_model(model) / "model.safetensors"))


# --------------------------------------------------------------------------- frozen
def test_frozen_keeps_backbone_bit_identical(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot]
) -> None:
    snap = snapshot("frozen")
    res = _run(tmp_path, tiny_csv(), "method=frozen", "train.max_steps=5")
    head = {n for n, rg in snap.requires_grad.items() if rg}
    assert head == {
        "classifier.weight",
        "classifier.bias",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
    }
    changed = _changed(snap)
    assert all(changed[n] for n in head)  # the head (and the freshly initialised pooler) trained
    assert not any(changed[n] for n in snap.initial if n not in head)

    # the saved folder is a plain transformers classifier whose backbone is the pretrained one
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(res.run_dir / "model")
    base = _base_weights("tiny-bert")
    saved_params = dict(saved.named_parameters())
    backbone = [n for n in saved_params if n in base]
    assert len(backbone) == len(saved_params) - 4  # everything but pooler + classifier comes from the base
    for n in backbone:
        assert torch.equal(saved_params[n], base[n]), n
    for n in head:
        assert torch.equal(saved_params[n], dict(snap.model.named_parameters())[n])
        assert not torch.equal(saved_params[n], snap.initial[n])
    assert saved.config.num_labels == 3
    assert res.metrics["train"]["steps"] == 5


def test_frozen_caches_features_once(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot], monkeypatch
) -> None:
    calls: list[int] = []
    snap = snapshot("frozen")
    module = importlib.import_module(get_method("frozen").module)
    real_apply = module.METHOD.apply  # the snapshot wrapper

    def apply(model, run, ctx):
        model = real_apply(model, run, ctx)
        model.base_model.register_forward_hook(lambda m, args, out: calls.append(1))
        return model

    monkeypatch.setattr(module, "METHOD", dataclasses.replace(module.METHOD, apply=apply))
    res = _run(tmp_path, tiny_csv(60), "method=frozen", "train.epochs=3")
    # 60 rows -> 54 train + 6 validation; batch 8 -> 7 steps per epoch; features in batches of 16
    assert res.metrics["train"]["steps"] == 21
    n_train, n_val, eval_bs = 54, 6, 16
    extraction = math.ceil(n_train / eval_bs) + math.ceil(n_val / eval_bs)
    final_eval = math.ceil(n_val / eval_bs)  # the pipeline's last evaluation runs the full saved model
    assert len(calls) == extraction + final_eval == 6
    assert not any(_changed(snap)[n] for n in snap.initial if n.startswith("bert.") and "pooler" not in n)


def test_frozen_without_cache_runs_backbone_each_step(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot]
) -> None:
    snap = snapshot("frozen")
    res = _run(tmp_path, tiny_csv(), "method=frozen", "method.cache_features=false", "train.max_steps=3")
    changed = _changed(snap)
    assert res.metrics["train"]["steps"] == 3
    assert changed["classifier.weight"]
    assert not any(changed[n] for n in snap.initial if n.startswith("bert.") and "pooler" not in n)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-roberta"])
def test_frozen_other_architectures(
    model: str, tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot]
) -> None:
    snap = snapshot("frozen")
    _run(tmp_path, tiny_csv(), "method=frozen", "train.max_steps=4", model=model)
    head = {n for n, rg in snap.requires_grad.items() if rg}
    if model == "tiny-roberta":
        assert head == {f"classifier.{m}.{w}" for m in ("dense", "out_proj") for w in ("weight", "bias")}
    else:  # decoder classification head
        assert head == {"score.weight"}
    changed = _changed(snap)
    assert all(changed[n] for n in head)
    base = _base_weights(model)
    final = dict(snap.model.named_parameters())
    backbone = [n for n in final if n.startswith(PREFIX[model])]
    assert backbone and all(n in base for n in backbone)
    for n in backbone:
        assert torch.equal(final[n], base[n]), n


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-roberta", "tiny-llama", "tiny-gpt2"])
def test_feature_head_matches_full_forward(model: str) -> None:
    """Training the frozen head on cached features is training the real head: same logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(model)
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if clf.config.pad_token_id is None:
        clf.config.pad_token_id = tok.pad_token_id
    texts = ["a", "the movie was great", "i did not like the long and boring film at all", "ok"]
    ids = [tok(t)["input_ids"] for t in texts]
    batch = TokenBatches({"input_ids": ids}, tok.pad_token_id).collate(range(len(texts)))
    assert batch["attention_mask"].sum(-1).tolist() == [len(x) for x in ids]
    obj = ClassificationObjective(load_config(None, []))
    extract, head = obj.feature_head(clf)
    with torch.no_grad():
        cached = head(features=extract(batch)).logits
        full = clf(**batch).logits
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- partial
def test_partial_freezes_embeddings_and_bottom_layers(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot]
) -> None:
    snap = snapshot("partial")
    _run(tmp_path, tiny_csv(), "method=partial", "method.freeze_layers=1", "train.max_steps=5")
    changed = _changed(snap)
    for n, did in changed.items():
        if n.startswith("bert.embeddings.") or ".layer.0." in n:
            assert not snap.requires_grad[n], n
            assert not did, n
        else:  # layer.1, pooler, classifier
            assert snap.requires_grad[n], n
            assert did, n
    assert any(".layer.1." in n for n in changed)
    trainable, total = snap.trainable
    manual = sum(
        p.numel()
        for n, p in snap.model.named_parameters()
        if ".layer.1." in n or "pooler" in n or n.startswith("classifier")
    )
    assert trainable == manual
    assert total == sum(p.numel() for p in snap.model.parameters())


def test_partial_keeps_embeddings_trainable_when_asked() -> None:
    from transformers import AutoModelForSequenceClassification

    from tuneforge.methods.base import MethodContext

    model, info = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("tiny-bert"), num_labels=2, output_loading_info=True
    )

    run = load_config(None, ["method=partial", "method.freeze_layers=2", "method.freeze_embeddings=false"])
    ctx = MethodContext(head_parameter_names(model, info["missing_keys"]), 2)
    importlib.import_module(get_method("partial").module).apply(model, run, ctx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".layer." not in n}


def test_partial_gpt2(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot]
) -> None:
    snap = snapshot("partial")
    _run(
        tmp_path,
        tiny_csv(),
        "method=partial",
        "method.freeze_layers=1",
        "train.max_steps=4",
        model="tiny-gpt2",
    )
    changed = _changed(snap)
    frozen = {
        n for n in changed if n.startswith(("transformer.wte.", "transformer.wpe.", "transformer.h.0."))
    }
    assert frozen and not any(changed[n] for n in frozen)
    assert all(changed[n] for n in changed if n not in frozen)  # h.1, ln_f, score


def test_partial_too_many_layers_is_a_config_error(tmp_path: Path, tiny_csv: Callable[..., Path]) -> None:
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _run(tmp_path, tiny_csv(), "method=partial", "method.freeze_layers=3", "train.max_steps=1")
    assert info.value.key == "method.freeze_layers"
    assert "allowed 0..2" in str(info.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory is created


# --------------------------------------------------------------------------- full (+ LLRD)
def test_full_changes_every_parameter(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot]
) -> None:
    snap = snapshot("full")
    _run(tmp_path, tiny_csv(), "method=full", "train.max_steps=3")
    assert all(snap.requires_grad.values())
    changed = _changed(snap)
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    trainable, total = snap.trainable
    assert trainable == total == sum(p.numel() for p in snap.model.parameters())


def test_full_with_llrd_scales_updates_by_depth(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot]
) -> None:
    snap = snapshot("full")
    res = _run(
        tmp_path,
        tiny_csv(),
        "method=full",
        "train.max_steps=3",
        "train.layer_lr_decay=0.5",
        "train.weight_decay=0",
        "train.schedule=constant",
        "train.max_grad_norm=null",
    )
    assert res.metrics["train"]["steps"] == 3
    changed = _changed(snap)
    assert all(changed.values())
    # Adam moves every coordinate with a consistent gradient by ~lr per step: the largest move of a
    # parameter is bounded by steps * its group's lr (3 * lr * 0.5 ** (L + 1 - depth)).
    final = dict(snap.model.named_parameters())
    top_move: dict[int, float] = {}
    for n, v in snap.initial.items():
        depth = 3 if n.startswith("classifier") or "pooler" in n else param_depth(n, 2)
        move = float((final[n].detach() - v).abs().max())
        assert move <= 3 * 1e-3 * 0.5 ** (3 - depth) * 1.01, n
        top_move[depth] = max(top_move.get(depth, 0.0), move)
    # and each depth reaches a good part of its bound, so the levels are really different
    for depth, move in top_move.items():
        assert move > 0.5 * 1e-3 * 0.5 ** (3 - depth), (depth, move)


# --------------------------------------------------------------------------- counts
def test_trainable_summary_counts_shared_once() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    assert trainable_summary(model) == (total, total)
    model.transformer.wte.weight.requires_grad_(False)
    frozen = model.transformer.wte.weight.numel()
    assert trainable_summary(model) == (total - frozen, total)
    for p in model.parameters():
        p.requires_grad_(False)
    assert trainable_summary(model) == (0, total)


def test_printed_parameter_counts(
    tmp_path: Path, tiny_csv: Callable[..., Path], snapshot: Callable[[str], Snapshot], capsys
) -> None:
    snap = snapshot("frozen")
    _run(tmp_path, tiny_csv(), "method=frozen", "train.max_steps=1", quiet=False)
    out = capsys.readouterr().out
    m = re.search(
        r"model tiny-bert: ([\d,]+) parameters, ([\d,]+) trainable \(([\d.]+)%\) with method 'frozen'", out
    )
    assert m, out
    total, trainable = (int(g.replace(",", "")) for g in m.groups()[:2])
    manual_total = sum(p.numel() for p in snap.model.parameters())
    manual_head = sum(
        p.numel() for n, p in snap.model.named_parameters() if n.startswith("classifier") or "pooler" in n
    )
    assert (trainable, total) == (manual_head, manual_total) == snap.trainable
    assert float(m.group(3)) == pytest.approx(100 * manual_head / manual_total, abs=0.005)
    assert manual_head == 32 * 32 + 32 + 32 * 3 + 3  # pooler dense + classifier (3 labels)
