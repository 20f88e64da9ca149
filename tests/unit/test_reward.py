"""Reward models (``task: reward``): encoder and decoder heads train on pairs, beat the length baseline, save as
one-label sequence classifiers, score texts, and run through the CLI (bad inputs exit 2 naming file:line)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_preference_data import synthetic_pairs, write_jsonl

from tuneforge.config import load_config
from tuneforge.pipeline import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from _common import cli


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reward-data")
    return (write_jsonl(root / "train.jsonl", synthetic_pairs(96, seed=0)),
            write_jsonl(root / "val.jsonl", synthetic_pairs(32, seed=1)))


def _run(model: str, train_file: Path, val: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model={model}", "task=reward", f"data.train={train_file}", f"data.validation={val}", "data.max_length=48",
        "train.batch_size=8", "train.log_steps=5", "train.warmup_steps=0", "train.schedule=constant",
        "train.precision=fp32", "train.tensorboard=false", "train.seed=0", f"output_dir={out}", *extra,
    ])


def test_length_baseline_counts_ties_half(pairs) -> None:
    from tuneforge.data.preference import read_preferences
    from tuneforge.objectives.reward import length_accuracy

    val = read_preferences(pairs[1])
    expected = sum(1.0 if len(p.chosen) > len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0
                   for p in val.items) / len(val)
    assert length_accuracy(val) == expected and 0.2 < expected < 0.8


@pytest.fixture(scope="module")
def bert_run(pairs, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("reward-bert") / "run"
    return train(_run("tiny-bert", *pairs, out, "train.max_steps=60", "train.lr=3e-3", "train.eval_steps=60"),
                 quiet=True)


def test_tiny_bert_reward_model_learns_and_beats_the_length_baseline(bert_run) -> None:
    m = bert_run.metrics["splits"]["validation"]
    assert {"accuracy", "margin", "loss", "length_accuracy", "chosen_reward", "rejected_reward"} <= set(m)
    assert m["accuracy"] >= 0.9 > m["length_accuracy"]
    assert m["margin"] > 0 and m["loss"] < math.log(2)


def test_saved_reward_model_is_a_one_label_classifier_and_predict_scores_texts(bert_run) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.inference import predict_texts

    folder = bert_run.run_dir / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.num_labels == 1
    texts = ["User: what do you think of the song?\n\nAssistant: the song was great",
             "User: what do you think of the song?\n\nAssistant: the song was awful"]
    rows = predict_texts(bert_run.run_dir, texts, None, [])
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        direct = model(**tok(texts, return_tensors="pt", padding=True)).logits.squeeze(-1)
    assert [r["text"] for r in rows] == texts
    assert torch.allclose(torch.tensor([r["reward"] for r in rows]), direct, atol=1e-5)
    assert rows[0]["reward"] > rows[1]["reward"]


def test_decoder_reward_model_with_lora_trains_and_reloads(pairs, tmp_path: Path) -> None:
    from tuneforge.inference import evaluate_file

    result = train(_run("tiny-llama", *pairs, tmp_path / "run", "method=lora", "train.max_steps=6", "train.lr=5e-3",
                        "train.eval_steps=6"), quiet=True)
    m = result.metrics["splits"]["validation"]
    again = evaluate_file(result.run_dir, pairs[1], [])
    assert math.isclose(again["accuracy"], m["accuracy"]) and math.isclose(again["loss"], m["loss"], rel_tol=1e-4)
    cfg = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert cfg.get("pad_token_id") is not None  # decoders pool the last real token: the pad id is saved


def test_cli_train_eval_and_bad_inputs(pairs, tmp_path: Path) -> None:
    train_file, val = pairs
    args = ["train", "model=tiny-bert", "task=reward", f"data.train={train_file}", f"data.validation={val}",
            "data.max_length=48", "train.batch_size=8", "train.max_steps=4", "train.tensorboard=false",
            "output_dir=run", "-q"]
    cli(*args, cwd=tmp_path)
    proc = cli("eval", "run", "--data", str(val), "--json", cwd=tmp_path)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"accuracy", "margin", "loss"} <= set(metrics)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "a"}])
    proc = cli("train", *[a if not a.startswith("data.train=") else f"data.train={bad}" for a in args[1:]],
               "output_dir=run2", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr + proc.stdout and "rejected" in proc.stderr + proc.stdout
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "p", "chosen": "", "rejected": "b"}])
    proc = cli("eval", "run", "--data", str(empty), "--json", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "empty.jsonl:1" in proc.stderr + proc.stdout
