"""The CLI as a user runs it: train tiny-bert on a CSV, inspect the run directory, then eval and predict
from it, and check the saved model loads in plain transformers with the same predictions."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _common import CACHE, cli, sentiment_rows, write_csv

pytestmark = pytest.mark.e2e

LABELS = ("negative", "neutral", "positive")


PARITY_TEXTS = [
    "i love this movie",
    "what a terrible book",
    "the meal is on the table",
    "best song ever",
    "worst phone ever",
    "there is a car",
    "a really good meal",
    "a really bad song",
    "i saw a book today",
    "the car was wonderful",
    "the phone was awful",
    "a movie exists",
    "what a great phone",
    "i hate this car",
    "this is a song",
    "good",
    "the weather is cold and grey",
    "absolutely horrible",
    "a b c",
    "love love love",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("workflow")
    write_csv(d / "train.csv", sentiment_rows(90))
    write_csv(d / "val.csv", sentiment_rows(30, offset=90))
    return d


@pytest.fixture(scope="module")
def trained(workdir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny-bert run (bf16 autocast where the CPU has it, the default) with an explicit validation file."""
    run = workdir / "run"
    proc = cli(
        "train",
        "model=tiny-bert",
        "data.train=train.csv",
        "data.validation=val.csv",
        f"output_dir={run}",
        "train.max_steps=40",
        "train.batch_size=8",
        "train.lr=1e-2",
        "train.eval_steps=20",
        "train.log_steps=5",
        cwd=workdir,
    )
    return run, proc


# --------------------------------------------------------------------------- the run directory


def test_train_prints_done_and_progress(trained):
    run, proc = trained
    assert f"done: {run}" in proc.stdout
    assert "accuracy=" in proc.stdout
    assert "%|" in proc.stderr  # progress bars are shown by default (see test_quiet for the opposite)
    assert "Traceback" not in proc.stderr


def test_run_directory_layout(trained):
    run, _ = trained
    assert (run / "config.yaml").is_file()
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["model"]["name"] == "tiny-bert"
    assert cfg["train"]["max_steps"] == 40

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in records if r["split"] == "train")
    assert [r["step"] for r in records if r["split"] == "eval"] == [20, 40]

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert {"train", "splits", "eval"} <= set(metrics)
    assert metrics["train"]["steps"] == 40
    val = metrics["splits"]["validation"]
    assert 0.0 <= val["accuracy"] <= 1.0 and 0.0 <= val["macro_f1"] <= 1.0
    assert val["labels"] == list(LABELS)
    assert metrics["eval"]["accuracy"] == val["accuracy"]
    assert val["majority_accuracy"] == pytest.approx(1 / 3)

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    for name in ("loss.png", "lr.png", "eval_metrics.png"):
        png = run / "plots" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "accuracy" in report and "tiny-bert" in report

    model = run / "model"
    assert (model / "config.json").is_file()
    assert json.loads((model / "labels.json").read_text(encoding="utf-8"))["labels"] == list(LABELS)
    assert (model / "tokenizer.json").is_file() and (model / "tokenizer_config.json").is_file()
    assert (model / "model.safetensors").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts and all((run / "checkpoints" / c / "state.json").is_file() for c in ckpts)
    leftovers = [p.name for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_training_learned_something(trained):
    run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    # 40 steps at lr 1e-2 separate at least the neutral class from the sentiment ones
    assert metrics["splits"]["validation"]["accuracy"] > metrics["splits"]["validation"]["majority_accuracy"]


# --------------------------------------------------------------------------- eval


def test_eval_json_matches_training_validation_metrics(trained, workdir):
    run, _ = trained
    proc = cli("eval", str(run), "--data", "val.csv", "--json", cwd=workdir)
    out = json.loads(proc.stdout)
    assert isinstance(out, dict)
    assert all(isinstance(v, (int, float)) for v in out.values()), "eval --json must be flat"
    for key in ("accuracy", "macro_f1"):
        assert isinstance(out[key], float) and 0.0 <= out[key] <= 1.0
    val = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["splits"]["validation"]
    # Same weights, same precision (bf16 autocast on this CPU, recorded in config.yaml), same eval batch size
    # and the same length-sorted batch plan: the numbers are bit-identical.
    assert abs(out["accuracy"] - val["accuracy"]) <= 1e-9
    assert abs(out["macro_f1"] - val["macro_f1"]) <= 1e-9
    assert abs(out["loss"] - val["loss"]) <= 1e-9


# --------------------------------------------------------------------------- predict


def _check_prediction(row: dict, text: str) -> None:
    assert row["text"] == text
    assert row["label"] in LABELS
    probs = {k: v for k, v in row.items() if k.startswith("p_")}
    assert set(probs) == {f"p_{n}" for n in LABELS}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(probs, key=probs.get) == f"p_{row['label']}"


def test_predict_texts_prints_json_lines(trained, workdir):
    run, _ = trained
    proc = cli("predict", str(run), "text one", "what a great movie", cwd=workdir)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2
    for line, text in zip(lines, ("text one", "what a great movie"), strict=True):
        _check_prediction(json.loads(line), text)


def test_predict_file_to_jsonl_and_csv(trained, workdir):
    run, _ = trained
    texts = PARITY_TEXTS[:7]
    inp = write_csv(workdir / "inputs.csv", [(t,) for t in texts], header=("text",))

    out_jsonl = workdir / "preds.jsonl"
    proc = cli("predict", str(run), "--input", str(inp), "--output", str(out_jsonl), cwd=workdir)
    assert "wrote 7 predictions" in proc.stdout
    rows = [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(texts)
    for row, text in zip(rows, texts, strict=True):
        _check_prediction(row, text)

    out_csv = workdir / "preds.csv"
    cli("predict", str(run), "--input", str(inp), "--output", str(out_csv), cwd=workdir)
    with out_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["text", "label", *(f"p_{n}" for n in LABELS)]
        csv_rows = list(reader)
    assert len(csv_rows) == len(texts)
    for crow, jrow in zip(csv_rows, rows, strict=True):
        _check_prediction(
            {**crow, **{k: float(v) for k, v in crow.items() if k.startswith("p_")}}, jrow["text"]
        )
        assert crow["label"] == jrow["label"]


def _hf_fp32_probs(model_dir: Path, texts: list[str]):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits.float(), -1)
    id2label = model.config.id2label
    return probs, [id2label[int(i)] for i in probs.argmax(-1)], [id2label[i] for i in range(len(id2label))]


def test_plain_transformers_parity(trained, workdir):
    """run/model loads in plain transformers (fp32) and agrees with `tuneforge predict`."""
    run, _ = trained
    probs, labels, names = _hf_fp32_probs(run / "model", PARITY_TEXTS)
    assert names == list(LABELS)

    # fp32 predict: the same computation, so the same numbers (up to padding-order float noise)
    proc = cli("predict", str(run), *PARITY_TEXTS, "--set", "train.precision=fp32", cwd=workdir)
    fp32 = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert [r["label"] for r in fp32] == labels
    for r, p in zip(fp32, probs, strict=True):
        for j, n in enumerate(names):
            assert abs(r[f"p_{n}"] - float(p[j])) <= 2e-6

    # default predict: precision auto = bf16 autocast on CPUs with native bf16, so probabilities are close,
    # not identical; argmax labels agree wherever fp32 has a margin larger than the bf16 noise.
    proc = cli("predict", str(run), *PARITY_TEXTS, cwd=workdir)
    auto = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(auto) == len(PARITY_TEXTS)
    compared = 0
    for r, p, lab in zip(auto, probs, labels, strict=True):
        for j, n in enumerate(names):
            assert abs(r[f"p_{n}"] - float(p[j])) <= 1e-2
        top2 = p.topk(2).values
        if float(top2[0] - top2[1]) > 1e-2:
            assert r["label"] == lab, r
            compared += 1
    # not vacuous: the 40-step tiny model is decisive (margin > 1e-2) on 12-20 of these texts depending on its
    # dropout stream (12 since the last layer and the attention draw fewer / other masks)
    assert compared >= 10, f"only {compared} of 20 texts had a decisive fp32 margin"


# --------------------------------------------------------------------------- discoverability


def test_models_lists_builtins(workdir):
    proc = cli("models", cwd=workdir)
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"minilm-l6", "tiny-bert"} <= names


def test_help_exits_zero(workdir):
    proc = cli("--help", cwd=workdir)
    for verb in ("train", "eval", "predict", "validate", "models", "demo"):
        assert verb in proc.stdout


@pytest.mark.parametrize("verb", ["train", "eval", "predict", "validate", "models", "demo"])
def test_verb_help_exits_zero(verb, monkeypatch, capsys):
    from tuneforge import cli as tf_cli

    monkeypatch.setenv("TUNEFORGE_CACHE", str(CACHE))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["tuneforge", verb, "--help"])
    with pytest.raises(SystemExit) as exc:
        tf_cli.main()
    assert exc.value.code in (0, None)
    assert "Usage" in capsys.readouterr().out


def test_verb_help_subprocess(workdir):
    proc = cli("predict", "--help", cwd=workdir)
    assert "--input" in proc.stdout and "--output" in proc.stdout


# --------------------------------------------------------------------------- data layouts


def _short_train(
    workdir: Path, name: str, *overrides: str, quiet: bool = True
) -> tuple[Path, subprocess.CompletedProcess]:
    run = workdir / name
    args = [
        "train",
        "model=tiny-bert",
        f"output_dir={run}",
        "train.max_steps=4",
        "train.batch_size=8",
        "train.tensorboard=false",
        *overrides,
    ]
    if quiet:
        args.append("--quiet")
    return run, cli(*args, cwd=workdir)


def test_integer_labels_sorted_numerically_and_quiet(workdir):
    mapping = {"negative": 10, "neutral": 2, "positive": 1}
    rows = [(t, mapping[y]) for t, y in sentiment_rows(60)]
    write_csv(workdir / "ints.csv", rows)
    run, proc = _short_train(workdir, "run-ints", "data.train=ints.csv")
    assert "%|" not in proc.stderr, proc.stderr  # --quiet: no progress bars
    assert "Traceback" not in proc.stderr
    assert json.loads((run / "model" / "labels.json").read_text(encoding="utf-8"))["labels"] == [
        "1",
        "2",
        "10",
    ]
    cfg = json.loads((run / "model" / "config.json").read_text(encoding="utf-8"))
    assert cfg["id2label"] == {"0": "1", "1": "2", "2": "10"}
    pred = json.loads(cli("predict", str(run), "a movie", cwd=workdir).stdout.splitlines()[0])
    assert set(pred) == {"text", "label", "p_1", "p_2", "p_10"}


def test_headerless_tsv_by_column_index(workdir):
    rows = [(y, t) for t, y in sentiment_rows(60)]
    write_csv(workdir / "nohdr.tsv", rows, header=None, delimiter="\t")
    run, _ = _short_train(
        workdir,
        "run-tsv",
        "data.train=nohdr.tsv",
        "data.header=false",
        "data.text_column=1",
        "data.label_column=0",
        "data.format=tsv",
    )
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["splits"]["validation"]["labels"] == list(LABELS)
    # the saved recipe carries the layout, so eval reads the same kind of file without extra flags
    out = json.loads(cli("eval", str(run), "--data", "nohdr.tsv", "--json", cwd=workdir).stdout)
    assert 0.0 <= out["accuracy"] <= 1.0


def test_sentence_pairs(workdir):
    rows = []
    for i, (t, _y) in enumerate(sentiment_rows(60)):
        other = sentiment_rows(1, offset=i + 1)[0][0]
        rows.append((t, other, "same" if i % 2 else "different"))
    write_csv(workdir / "pairs.csv", rows, header=("premise", "hypothesis", "label"))
    run, _ = _short_train(
        workdir,
        "run-pairs",
        "data.train=pairs.csv",
        "data.text_column=premise",
        "data.text_pair_column=hypothesis",
    )
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["splits"]["validation"]["labels"] == ["different", "same"]
    inp = write_csv(workdir / "pair_inputs.csv", [("i love this movie", "a car"), ("a book", "a book")],
                    header=("premise", "hypothesis"))
    out = workdir / "pair_preds.jsonl"
    cli("predict", str(run), "--input", str(inp), "--output", str(out), cwd=workdir)
    preds = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 2 and all(p["label"] in ("different", "same") for p in preds)
    assert all(p["p_different"] + p["p_same"] == pytest.approx(1.0, abs=1e-5) for p in preds)
