"""Extractive QA (`task: extractive_qa`): official SQuAD metrics, n-best post-processing, windowing, data
validation, config refusals and a short tiny-bert run that learns a synthetic span task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tuneforge.config import load_config
from tuneforge.data.squad import QAExamples, carve_by_group, read_squad
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.squad import best_answers, f1_score, normalize_answer, squad_metrics

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta", "rho", "tau"]
NAMES = ["paris", "london", "berlin", "madrid", "rome", "vienna", "oslo", "lima", "cairo", "tokyo"]


def synthetic_rows(n: int, seed: int = 0, filler: int = 12) -> list[dict]:
    """Contexts of filler words with one sentence 'the city is NAME .' somewhere; the question asks for it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        before = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, filler)))
        after = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, filler)))
        name = rng.choice(NAMES)
        prefix = (before + " " if before else "") + "the city is "
        context = prefix + name + " . " + after
        rows.append({"id": f"q{i}", "question": "which city is it ?", "context": context,
                     "answers": {"text": [name], "answer_start": [len(prefix)]}})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def to_squad_json(path: Path, rows: list[dict], per_article: int = 4) -> Path:
    data = []
    for a in range(0, len(rows), per_article):
        paras = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"], "answers": [
            {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)]}]}
                 for r in rows[a:a + per_article]]
        data.append({"title": f"article {a}", "paragraphs": paras})
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return path


# ---------------------------------------------------------------- metrics (official SQuAD formulas)
def test_normalize_answer_matches_official_rules() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear") == "apple pear"


def test_em_f1_hand_computed() -> None:
    # pred "the big cat" -> [big, cat]; gold "a cat sat" -> [cat, sat]: 1 common, P=1/2, R=1/2, F1=0.5
    assert f1_score("the big cat", "a cat sat") == pytest.approx(0.5)
    # max over gold answers: second gold is an exact match
    m = squad_metrics(["Paris", "big cat"], [["London", "paris."], ["cat"]])
    assert m["exact_match"] == pytest.approx(50.0)
    # second: pred [big, cat] vs [cat]: P=1/2, R=1 -> F1 = 2/3
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_v2_metrics_split_has_and_no_answer() -> None:
    m = squad_metrics(["", "x", "rome"], [[], [], ["Rome"]], version_2=True)
    assert m["NoAns_exact_match"] == pytest.approx(50.0)
    assert m["HasAns_f1"] == pytest.approx(100.0)
    assert m["exact_match"] == pytest.approx(200 / 3)


# ---------------------------------------------------------------- post-processing
def _offsets(n_question: int, n_context: int) -> np.ndarray:
    off = [(-1, -1)] * (1 + n_question + 1) + [(2 * i, 2 * i + 1) for i in range(n_context)] + [(-1, -1)]
    return np.array(off, dtype=np.int32)


def test_post_processing_picks_best_valid_span() -> None:
    context = "a b c d e f"  # token i covers chars [2i, 2i+1)
    off = _offsets(2, 6)  # tokens 0..3 are CLS, q, q, SEP; context tokens 4..9; 10 is SEP
    start, end = np.full(len(off), -100.0), np.full(len(off), -100.0)
    start[1], end[2] = 50, 50  # best pair lies in the question: never chosen
    start[9], end[4] = 40, 40  # end before start: invalid
    start[5], end[7] = 10, 10  # valid: tokens 5..7 -> context chars 2..7 = "b c d"
    start[0], end[0] = 100, 100  # null (CLS) is not an answer in v1
    a = best_answers([start], [end], [off], [0], [context], n_best=20, max_answer_length=30)[0]
    assert (a.text, a.start, a.end) == ("b c d", 2, 7)
    # with max_answer_length 2 the 3-token span is out; the best remaining span is chosen
    b = best_answers([start], [end], [off], [0], [context], n_best=20, max_answer_length=2)[0]
    assert len(b.text.split()) <= 2 and b.text
    # v2: the null score beats the best span by more than the threshold -> no answer
    c = best_answers([start], [end], [off], [0], [context], version_2=True, null_threshold=0.0)[0]
    assert c.text == ""


def test_post_processing_best_over_windows() -> None:
    context = "a b c d e f"
    off1, off2 = _offsets(1, 6), _offsets(1, 6)
    s1, e1, s2, e2 = (np.zeros(len(off1)) for _ in range(4))
    s1[3], e1[3] = 1, 1  # "a" scores 2 in window 1
    s2[7], e2[7] = 5, 5  # "e" scores 10 in window 2
    a = best_answers([s1, s2], [e1, e2], [off1, off2], [0, 0], [context])[0]
    assert a.text == "e"


# ---------------------------------------------------------------- windowing
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tuneforge.models.registry import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))


def test_windows_cover_context_and_map_answer(tokenizer) -> None:
    from tuneforge.objectives.configs.extractive_qa import ExtractiveQAConfig
    from tuneforge.objectives.extractive_qa import windows

    rows = synthetic_rows(6, seed=3, filler=60)
    ex = QAExamples([r["id"] for r in rows], [r["question"] for r in rows], [r["context"] for r in rows],
                    [list(zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)) for r in rows])
    task = ExtractiveQAConfig(max_length=48, doc_stride=16, max_question_length=16)
    data = windows(ex, tokenizer, task)
    assert len(data) > len(ex)  # long contexts became several windows
    for e, context in enumerate(ex.contexts):
        feats = [f for f, x in enumerate(data.feature_example) if x == e]
        covered = np.zeros(len(context), dtype=bool)
        found = False
        for f in feats:
            off = data.offsets[f]
            for a, b in off[off[:, 0] >= 0]:
                covered[a:b] = True
            s, t = data.columns["start_positions"][f], data.columns["end_positions"][f]
            if s:
                text, start = ex.answers[e][0]
                assert (off[s, 0], off[t, 1]) == (start, start + len(text))
                assert context[off[s, 0]:off[t, 1]] == text
                found = True
        assert found
        assert all(covered[i] for i, ch in enumerate(context) if not ch.isspace())


# ---------------------------------------------------------------- data validation
def test_reader_jsonl_and_json(tmp_path: Path) -> None:
    rows = synthetic_rows(8)
    a = read_squad(write_jsonl(tmp_path / "a.jsonl", rows), allow_unanswerable=False)
    b = read_squad(to_squad_json(tmp_path / "b.json", rows), allow_unanswerable=False)
    assert a.questions == b.questions and a.answers == b.answers
    tr, va = carve_by_group(b, 0.25, seed=0)
    assert len(tr) + len(va) == 8 and not set(tr.contexts) & set(va.contexts)
    assert not set(tr.groups) & set(va.groups)


def test_bad_answer_start_names_file_and_line(tmp_path: Path) -> None:
    rows = synthetic_rows(3)
    rows[1]["answers"]["answer_start"][0] += 1
    with pytest.raises(DataError, match="does not point at the answer") as info:
        read_squad(write_jsonl(tmp_path / "bad.jsonl", rows), allow_unanswerable=False)
    assert info.value.line == 2 and info.value.path.endswith("bad.jsonl")
    with pytest.raises(DataError, match="question 'q1'"):
        read_squad(to_squad_json(tmp_path / "bad.json", rows), allow_unanswerable=False)


def test_unanswerable_needs_v2(tmp_path: Path) -> None:
    rows = synthetic_rows(2)
    rows[1]["answers"] = {"text": [], "answer_start": []}
    path = write_jsonl(tmp_path / "v2.jsonl", rows)
    with pytest.raises(DataError, match="version_2_with_negative"):
        read_squad(path, allow_unanswerable=False)
    assert read_squad(path, allow_unanswerable=True).answers[1] == []


def test_doc_stride_too_large_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["task=extractive_qa", "model=tiny-bert", "task.max_length=128", "task.doc_stride=100"])
    assert "task.doc_stride" in str(info.value)


# ---------------------------------------------------------------- a short run that learns
@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def test_tiny_bert_learns_synthetic_qa(tmp_path: Path) -> None:
    from tuneforge.inference import evaluate_file, predict_texts
    from tuneforge.pipeline import train

    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_rows(192, seed=1))
    val_file = write_jsonl(tmp_path / "val.jsonl", synthetic_rows(48, seed=2))
    base = ["task=extractive_qa", "model=tiny-bert", f"data.train={train_file}", f"data.validation={val_file}",
            "task.max_length=64", "task.doc_stride=16", "task.max_question_length=16", "train.batch_size=16",
            "train.lr=3e-3", "train.warmup_steps=0", "train.precision=fp32", "train.tensorboard=false",
            "train.seed=0", "train.log_steps=1"]
    before = train(load_config(None, [*base, "train.max_steps=1", "train.lr=1e-9", f"output_dir={tmp_path / 'r0'}"]),
                   quiet=True).metrics["splits"]["validation"]
    res = train(load_config(None, [*base, "train.epochs=8", f"output_dir={tmp_path / 'r1'}"]), quiet=True)
    after = res.metrics["splits"]["validation"]
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train" and r.get("loss") is not None]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert after["f1"] > before["f1"] + 20 and after["exact_match"] > before["exact_match"] + 20, (before, after)
    flat = evaluate_file(tmp_path / "r1", val_file, [])
    assert flat["f1"] == pytest.approx(after["f1"]) and "exact_match" in flat
    rows = synthetic_rows(1, seed=9)
    pred = predict_texts(tmp_path / "r1", [f"{rows[0]['question']} ||| {rows[0]['context']}"], None, [])[0]
    assert {"answer", "start", "end", "score"} <= set(pred)
    assert rows[0]["context"][pred["start"]:pred["end"]] == pred["answer"]
    # --input: JSONL rows {question, context}
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"question": r["question"], "context": r["context"]}
                                                     for r in synthetic_rows(4, seed=11)])
    preds = predict_texts(tmp_path / "r1", [], inputs, [])
    assert len(preds) == 4 and all(p["text"] == "which city is it ?" for p in preds)
    # the CLI prints exact_match and f1 flat
    from typer.testing import CliRunner

    from tuneforge.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "r1"), "--data", str(val_file), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["f1"] == pytest.approx(after["f1"]) and "exact_match" in printed


def test_v2_run_reports_has_and_no_answer(tmp_path: Path) -> None:
    from tuneforge.pipeline import train

    rows = synthetic_rows(24, seed=4)
    for r in rows[::3]:  # every third question has no answer
        r["answers"] = {"text": [], "answer_start": []}
    train_file = write_jsonl(tmp_path / "v2.jsonl", rows)
    res = train(load_config(None, [
        "task=extractive_qa", "model=tiny-bert", f"data.train={train_file}", "task.version_2_with_negative=true",
        "task.max_length=48", "task.doc_stride=8", "task.max_question_length=12", "train.batch_size=8",
        "train.max_steps=2", "train.precision=fp32", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}"]),
        quiet=True)
    val = res.metrics["splits"]["validation"]
    assert {"HasAns_exact_match", "HasAns_f1", "NoAns_exact_match", "NoAns_f1"} <= set(val)
    assert val["HasAns_total"] >= 1 and val["NoAns_total"] >= 1
