"""Masked LM: measured masking rates (15% / 80-10-10, configurable, whole words), special tokens never
selected, masks from the global RNG (exact resume) and fixed-seed evaluation, our masked-positions-only
loss against transformers' own, and a short run that learns, reports forgetting and saves a plain folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from tuneforge.config import load_config
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError
from tuneforge.models import resolve_model
from tuneforge.objectives.base import step_loss
from tuneforge.objectives.mlm import MLMObjective, word_start_table
from tuneforge.pipeline import train

CORPUS = Path(__file__).resolve().parents[2] / "src" / "tuneforge" / "assets" / "tiny_corpus.txt"


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def bert_tok():
    return AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))


def _objective(*overrides: str) -> MLMObjective:
    return MLMObjective(load_config(None, ["task=mlm", "model=tiny-bert", *overrides]))


def _random_blocks(tok, rows: int, length: int = 128, seed: int = 0) -> np.ndarray:
    """Random ordinary tokens with [CLS] at 0 and [SEP] at the middle and the end of every row."""
    special = set(tok.all_special_ids)
    ordinary = np.array([i for i in range(len(tok)) if i not in special])
    blocks = np.random.default_rng(seed).choice(ordinary, size=(rows, length))
    blocks[:, 0], blocks[:, length // 2], blocks[:, -1] = tok.cls_token_id, tok.sep_token_id, tok.sep_token_id
    return blocks


def _rates(blocks: np.ndarray, batch: dict[str, torch.Tensor], mask_id: int) -> dict[str, float]:
    ids, inputs, labels = torch.from_numpy(blocks), batch["input_ids"], batch["labels"]
    selected = labels != -100
    n = int(selected.sum())
    assert torch.equal(labels[selected], ids[selected])  # labels are the original tokens
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected tokens are untouched
    masked = int((inputs[selected] == mask_id).sum())
    kept = int((inputs[selected] == ids[selected]).sum())
    return {"selected": n, "mask": masked / n, "random": (n - masked - kept) / n, "kept": kept / n}


@pytest.mark.parametrize(("overrides", "p", "mask", "random"), [
    ((), 0.15, 0.8, 0.1),
    (("task.mlm_probability=0.3", "task.mask_replace_prob=0.5", "task.random_replace_prob=0.3"), 0.3, 0.5, 0.3),
])
def test_masking_rates_over_250k_tokens(bert_tok, overrides, p, mask, random) -> None:
    blocks = _random_blocks(bert_tok, 2000)  # 256,000 tokens, 6,000 of them special
    torch.manual_seed(0)
    batch = _objective(*overrides).transform(bert_tok)(blocks, None)
    special = np.isin(blocks, bert_tok.all_special_ids)
    assert special.sum() == 6000
    assert (batch["labels"].numpy()[special] == -100).all()  # never selected
    r = _rates(blocks, batch, bert_tok.mask_token_id)
    assert abs(r["selected"] / (~special).sum() - p) < 0.01
    # a random replacement can draw the original token (1 in ~1,000): counted as kept, well within 1 point
    assert abs(r["mask"] - mask) < 0.01 and abs(r["random"] - random) < 0.01
    assert abs(r["kept"] - (1 - mask - random)) < 0.01


def test_whole_word_masking_selects_whole_words_at_the_same_rate(bert_tok) -> None:
    text = " ".join(CORPUS.read_text(encoding="utf-8").split())
    ids = bert_tok(text, add_special_tokens=False).input_ids * 40
    length = 128
    blocks = np.array(ids[: len(ids) // length * length]).reshape(-1, length)
    assert blocks.size > 100_000
    torch.manual_seed(0)
    batch = _objective("task.whole_word_mask=true").transform(bert_tok)(blocks, None)
    starts = word_start_table(bert_tok)[blocks]
    starts[:, 0] = True
    word = np.cumsum(starts, axis=1)
    selected = batch["labels"].numpy() != -100
    for row in range(len(blocks)):  # every word is selected whole or not at all
        per_word = np.bincount(word[row], weights=selected[row], minlength=word[row].max() + 1)
        sizes = np.bincount(word[row], minlength=word[row].max() + 1)
        assert np.all((per_word == 0) | (per_word == sizes))
    assert (~starts).sum() > 0.05 * starts.size  # the data has multi-piece words
    r = _rates(blocks, batch, bert_tok.mask_token_id)
    assert abs(r["selected"] / blocks.size - 0.15) < 0.01
    assert abs(r["mask"] - 0.8) < 0.01 and abs(r["random"] - 0.1) < 0.01


def test_word_starts_for_byte_level_vocabularies() -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-roberta"))
    table = word_start_table(tok)
    pieces = tok.convert_ids_to_tokens(tok(" the unbelievable river", add_special_tokens=False).input_ids)
    flags = [bool(table[tok.convert_tokens_to_ids(p)]) for p in pieces]
    assert flags == [p.startswith("Ġ") for p in pieces] and flags[0] and not all(flags)


def test_masks_come_from_the_global_rng(bert_tok) -> None:
    blocks = _random_blocks(bert_tok, 8)
    apply = _objective().transform(bert_tok)
    torch.manual_seed(7)
    a = apply(blocks, None)
    torch.manual_seed(7)
    b = apply(blocks, None)
    c = apply(blocks, None)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(b["labels"], c["labels"])


def test_evaluation_is_fixed_and_leaves_the_global_rng_alone(bert_tok) -> None:
    from tuneforge.data.streaming import PackedBlocks, scan_corpus

    obj = _objective("task.eval_seed=3")
    corpus = scan_corpus(CORPUS, fmt=None, text_column="text", encoding="utf-8", key="data.train")
    data = PackedBlocks(corpus, bert_tok, 64, transform=obj.transform(bert_tok))
    model = AutoModelForMaskedLM.from_pretrained(resolve_model("tiny-bert"))
    state = torch.get_rng_state()
    a = obj.evaluate(model, data, batch_size=16, runtime=Runtime.cpu())
    b = obj.evaluate(model, data, batch_size=7, runtime=Runtime.cpu())
    assert torch.equal(state, torch.get_rng_state())
    assert a["masked_tokens"] == b["masked_tokens"] > 0.1 * 64 * len(data)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["perplexity"] == pytest.approx(np.exp(a["loss"]))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta"])
def test_loss_equals_transformers_mlm_loss(name: str) -> None:
    path = resolve_model(name)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForMaskedLM.from_pretrained(path).eval()
    blocks = np.array(tok([" ".join(CORPUS.read_text().split()[:400])], add_special_tokens=False).input_ids[0][:256])
    torch.manual_seed(0)
    batch = MLMObjective(load_config(None, ["task=mlm", f"model={name}"])).transform(tok)(blocks.reshape(4, 64), None)
    with torch.no_grad():
        ours, theirs = step_loss(_objective(), model, batch), model(**batch).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_bad_rates_and_models_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"at most 1 - task.mask_replace_prob = 0.1 \(got 0.2\)") as info:
        load_config(None, ["task=mlm", "task.mask_replace_prob=0.9", "task.random_replace_prob=0.2"])
    assert info.value.key == "task.random_replace_prob"
    for task in ("mlm", "span_corruption"):
        with pytest.raises(ConfigError, match=f"task '{task}' predicts tokens through the whole model") as info:
            load_config(None, [f"task={task}", "method=frozen"])
        assert info.value.key == "method.name"
    run = load_config(None, ["task=mlm", "model=tiny-gpt2", f"data.train={CORPUS}"])
    with pytest.raises(ConfigError, match="'tiny-gpt2' is a decoder model") as info:
        MLMObjective(run).load_data(run)
    assert info.value.key == "model"


def test_short_run_learns_reports_forgetting_and_saves_plain_folder(tmp_path: Path) -> None:
    general = tmp_path / "general.txt"
    general.write_text("\n".join(CORPUS.read_text(encoding="utf-8").splitlines()[::-1]), encoding="utf-8")
    run = load_config(None, [
        "task=mlm", "model=tiny-bert", f"data.train={CORPUS}", "data.max_length=64", f"task.general_eval={general}",
        "train.batch_size=16", "train.max_steps=16", "train.lr=2e-3", "train.warmup_steps=0", "train.precision=fp32",
        "train.eval_steps=8", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}",
    ])
    res = train(run, quiet=True)
    hist = json.loads(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert hist["eval_history"][-1]["loss"] < hist["eval_history"][0]["loss"]
    f = res.metrics["forgetting"]
    assert f["domain"]["loss"]["after"] < f["domain"]["loss"]["before"]
    assert f["domain"]["loss"]["change"] == pytest.approx(f["domain"]["loss"]["after"] - f["domain"]["loss"]["before"])
    assert f["domain"]["perplexity"]["after"] == pytest.approx(np.exp(f["domain"]["loss"]["after"]))
    assert f["domain"]["loss"]["after"] == pytest.approx(res.metrics["splits"]["validation"]["loss"])
    assert "## Forgetting" in (tmp_path / "run" / "report.md").read_text()
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "model")
    assert type(model).__name__ == "BertForMaskedLM"
    # `tuneforge eval` on the run reproduces the final validation loss (fixed evaluation masks)
    from tuneforge.inference import evaluate_file

    val = tmp_path / "val.txt"
    val.write_text("\n".join(CORPUS.read_text(encoding="utf-8").splitlines()[-31:]), encoding="utf-8")
    again = evaluate_file(tmp_path / "run", val, [])
    assert again["loss"] == pytest.approx(res.metrics["splits"]["validation"]["loss"], rel=1e-4)
