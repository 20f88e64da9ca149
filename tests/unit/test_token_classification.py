"""Token classification (NER): schemes, sub-word alignment, windows, metrics, data errors, a learning run,
and eval/predict on the saved run. Tiny-bert only; the CoNLL-2003 benchmark is `benchmarks/bench_ner.py`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.data.conll import from_iob2, read_tagged, spans, to_iob2
from tuneforge.errors import DataError
from tuneforge.eval.ner import ner_metrics
from tuneforge.objectives.token_classification import TokenClassificationObjective, align, label_set

PER = ["john", "mary", "peter", "anna", "paul", "lisa"]
LOC = [["paris"], ["london"], ["new", "york"], ["berlin"], ["san", "francisco"], ["rome"]]
ORG = [["google"], ["acme", "corp"], ["the", "united", "nations"], ["ibm"]]
FILL = ["the", "a", "today", "said", "that", "went", "to", "and", "with", "very", "big", "house", "was", "is"]


def make_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Synthetic NER rows: ``PER works for ORG in LOC`` style sentences with random filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words: list[str] = []
        tags: list[str] = []

        def add(ws: list[str], typ: str | None, words: list[str] = words, tags: list[str] = tags) -> None:
            for i, w in enumerate(ws):
                words.append(w)
                tags.append("O" if typ is None else ("B-" if i == 0 else "I-") + typ)

        add(rng.sample(FILL, rng.randint(0, 2)), None)
        add([rng.choice(PER)], "PER")
        add(["works", "for"], None)
        add(rng.choice(ORG), "ORG")
        add(["in"], None)
        add(rng.choice(LOC), "LOC")
        add(rng.sample(FILL, rng.randint(0, 3)), None)
        rows.append((words, tags))
    return rows


def write_conll(path: Path, rows: list[tuple[list[str], list[str]]], docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- O O", ""] if docstart else []
    for words, tags in rows:
        lines += [f"{w} NN O {t}" for w, t in zip(words, tags, strict=True)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[tuple[list[str], list[str]]]) -> Path:
    path.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- schemes
IOB2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-ORG"]


def test_scheme_conversions_round_trip() -> None:
    iob1 = from_iob2(IOB2, "iob1")
    assert iob1 == ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "B-LOC", "I-LOC", "O", "I-ORG"]
    bioes = from_iob2(IOB2, "bioes")
    assert bioes == ["B-PER", "E-PER", "S-PER", "O", "S-LOC", "B-LOC", "E-LOC", "O", "S-ORG"]
    assert to_iob2(iob1, "iob1") == IOB2
    assert to_iob2(bioes, "bioes") == IOB2
    assert from_iob2(to_iob2(iob1, "iob1"), "iob1") == iob1
    assert from_iob2(to_iob2(bioes, "bioes"), "bioes") == bioes
    assert spans(IOB2) == [("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4), ("LOC", 5, 6), ("ORG", 8, 8)]
    # conlleval: an I- without B- starts an entity
    assert spans(["O", "I-PER", "I-PER", "I-LOC"]) == [("PER", 1, 2), ("LOC", 3, 3)]


def test_reader_converts_schemes_and_skips_docstart(tmp_path: Path) -> None:
    rows = [(["a", "b", "c", "d"], ["I-PER", "I-PER", "O", "I-LOC"])]
    f = write_conll(tmp_path / "x.iob1", rows)
    out = read_tagged(f, scheme="iob1")
    assert out.tokens == [["a", "b", "c", "d"]] and out.tags == [["B-PER", "I-PER", "O", "B-LOC"]]
    assert out.lines == [3]
    bad = write_conll(tmp_path / "bad.bioes", [(["a", "b"], ["S-PER", "X-PER"])])
    with pytest.raises(DataError, match=r"bad.bioes:4: tag 'X-PER' is not valid in scheme bioes"):
        read_tagged(bad, scheme="bioes")


# ---------------------------------------------------------------------------- alignment
def test_alignment_first_vs_all_subtokens() -> None:
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    cont = [0, 2, 2, 4, 4]
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    words = [1, 0, 3]  # B-PER O B-LOC
    assert align(word_ids, words, cont, False) == [-100, 1, -100, 0, 3, -100, -100, -100]
    assert align(word_ids, words, cont, True) == [-100, 1, 2, 0, 3, 4, 4, -100]
    assert label_set([["B-PER", "O"], ["B-LOC", "I-LOC"]]) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert len(labels) == 5


def _objective(*extra: str) -> TokenClassificationObjective:
    run = load_config(None, ["model=tiny-bert", "task=token_classification", *extra])
    obj = TokenClassificationObjective(run)
    obj.labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    return obj


@pytest.fixture(scope="module")
def tokenizer():
    from tuneforge.models.registry import resolve_model
    from tuneforge.objectives.token_classification import _tokenizer

    return _tokenizer(resolve_model("tiny-bert"))


def test_prepare_aligns_with_a_real_tokenizer(tokenizer) -> None:
    from tuneforge.data.conll import TaggedSentences

    words = [["johannesburgian", "visited", "paris"]]
    tags = [["B-PER", "O", "B-LOC"]]
    for all_tokens in (False, True):
        obj = _objective(f"task.label_all_tokens={str(all_tokens).lower()}")
        data = obj.prepare(TaggedSentences(words, tags, "x", [1], [[1, 1, 1]]), tokenizer, obj.run)
        enc = tokenizer(words[0], is_split_into_words=True)
        wids = enc.word_ids()
        assert data.columns["input_ids"][0] == enc["input_ids"]
        lab = data.columns["labels"][0]
        n_first = sum(1 for i, w in enumerate(wids) if w is not None and wids[i - 1] != w)
        labelled = [x for x in lab if x != -100]
        if all_tokens:
            assert len(labelled) == sum(w is not None for w in wids)
            assert set(labelled[1:wids.count(0)]) <= {2}  # continuations of B-PER are I-PER
        else:
            assert len(labelled) == n_first == 3
            assert labelled == [1, 0, 3]


def test_long_sentences_split_into_windows_and_every_word_is_predicted_once(tokenizer) -> None:
    import torch
    from transformers import AutoModelForTokenClassification

    from tuneforge.data.conll import TaggedSentences
    from tuneforge.engine.runtime import Runtime
    from tuneforge.models.registry import resolve_model

    rows = make_sentences(6, seed=3)
    long_words = [w for ws, _ in rows for w in ws]
    long_tags = [t for _, ts in rows for t in ts]
    sents = TaggedSentences([rows[0][0], long_words, rows[1][0]], [rows[0][1], long_tags, rows[1][1]], "x",
                            [1, 2, 3], [])
    obj = _objective("data.max_length=16")
    obj.labels = label_set(sents.tags)
    data = obj.prepare(sents, tokenizer, obj.run)
    assert max(len(x) for x in data.columns["input_ids"]) <= 16
    assert len(data) > 3 and any("split into" in n for n in obj.notes)
    covered: dict[int, list[int]] = {}
    for w in data.windows:
        covered.setdefault(w.sentence, []).extend(range(w.first, w.first + len(w.positions)))
    for s, words in enumerate(sents.tokens):
        assert sorted(covered[s]) == list(range(len(words)))  # each word exactly once
    model = AutoModelForTokenClassification.from_pretrained(resolve_model("tiny-bert"), num_labels=len(obj.labels))
    probs, _, count = obj.word_scores(model, data, batch_size=4, runtime=Runtime.cpu())
    assert [p.shape[0] for p in probs] == [len(w) for w in sents.tokens]
    assert count == sents.num_words
    # the long sentence's per-word scores equal those of its windows run on their own
    w = next(w for w in data.windows if w.sentence == 1 and w.first > 0)
    sub = TaggedSentences([long_words[w.first : w.first + len(w.positions)]], None, "x", [1], [])
    alone, _, _ = obj.word_scores(model, obj.prepare(sub, tokenizer, obj.run), batch_size=4, runtime=Runtime.cpu())
    torch.testing.assert_close(torch.as_tensor(alone[0]), torch.as_tensor(probs[1][w.first : w.first + len(w.positions)]))


# ---------------------------------------------------------------------------- metrics
def test_metrics_equal_seqeval_and_a_hand_count() -> None:
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2 as SCHEME

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"], ["B-ORG", "O", "O", "O", "B-LOC"]]
    m = ner_metrics(gold, pred)
    # conlleval by hand: gold entities PER, LOC, ORG(2), PER = 4; predicted PER, LOC (I- without B- starts
    # one), ORG(1 word), LOC = 4; correct: PER(0-1), LOC(3) = 2 -> P = R = F1 = 0.5
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)
    # strict IOB2: the I-LOC without B- is no entity: 3 predicted, 1 correct -> P 1/3, R 1/4
    assert m["strict_f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert m["accuracy"] == pytest.approx(6 / 9)  # tags equal at 3 of 4 and 3 of 5 words
    assert m["f1"] == pytest.approx(f1_score(gold, pred))
    assert m["precision"] == pytest.approx(precision_score(gold, pred))
    assert m["recall"] == pytest.approx(recall_score(gold, pred))
    assert m["strict_f1"] == pytest.approx(f1_score(gold, pred, mode="strict", scheme=SCHEME))
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_type"]["LOC"]["precision"] == 0.5 and m["per_type"]["LOC"]["recall"] == 1.0


# ---------------------------------------------------------------------------- data errors
def test_data_errors_name_file_and_line(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.conll"
    ragged.write_text("EU NNP B-NP B-ORG\nrejects VBZ O\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged.conll:2: 3 columns, but line 1 has 4"):
        read_tagged(ragged)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: 2 tokens but 1 tags"):
        read_tagged(bad)
    train = write_conll(tmp_path / "train.conll", [(["john", "x"], ["B-PER", "O"])] * 4)
    val = write_conll(tmp_path / "val.conll", [(["john", "x"], ["B-PER", "O"]), (["rome"], ["B-LOC"])])
    run = load_config(None, ["model=tiny-bert", "task=token_classification", f"data.train={train}",
                             f"data.validation={val}"])
    with pytest.raises(DataError, match=r"val.conll:6: tag 'B-LOC' does not occur in the training data"):
        TokenClassificationObjective(run).load_data(run)


# ---------------------------------------------------------------------------- training, eval, predict
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    from tuneforge.pipeline import train

    root = tmp_path_factory.mktemp("ner")
    rows = make_sentences(260, seed=1)
    tr = write_conll(root / "train.conll", rows[:200])
    va = write_jsonl(root / "val.jsonl", rows[200:])
    out = root / "run"
    run = load_config(None, ["model=tiny-bert", "task=token_classification", f"data.train={tr}",
                             f"data.validation={va}", "train.epochs=3", "train.batch_size=16", "train.lr=5e-3",
                             "train.eval_on_start=true", "train.precision=fp32", "train.tensorboard=false",
                             "train.log_steps=5", f"output_dir={out}"])
    import tuneforge.pipeline as pipeline

    real, pipeline.write_plots = pipeline.write_plots, lambda run_dir: None
    try:
        res = train(run, quiet=True)
    finally:
        pipeline.write_plots = real
    return out, va, res


def test_tiny_bert_learns_synthetic_ner(trained) -> None:
    out, _, _ = trained
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    losses = [r["loss"] for r in rows if r["split"] == "train" and r.get("loss") is not None]
    assert evals[0]["step"] == 0
    assert losses[-1] < losses[0]
    assert evals[-1]["f1"] > evals[0]["f1"] + 0.3, (evals[0]["f1"], evals[-1]["f1"])
    assert json.loads((out / "model" / "labels.json").read_text())["labels"][0] == "O"


def test_eval_and_predict_on_the_saved_run(trained) -> None:
    from tuneforge.inference import evaluate_file, predict_texts

    out, va, res = trained
    flat = evaluate_file(out, va, [])
    for key in ("f1", "precision", "recall", "accuracy", "strict_f1", "loss", "f1/PER", "precision/LOC"):
        assert key in flat, key
    final = res.metrics["splits"]["validation"]
    assert flat["f1"] == pytest.approx(final["f1"], abs=1e-6)
    rows = predict_texts(out, ["john works for google in paris", "mary  works for ibm in new york today"], None, [])
    assert len(rows) == 2 and len(rows[1]["tags"]) == 8
    for row in rows:
        for ent in row["entities"]:
            assert row["text"][ent["start"] : ent["end"]] == ent["text"]
            assert 0.0 <= ent["score"] <= 1.0
    assert any(e["type"] == "PER" and e["text"] == "john" for e in rows[0]["entities"]), rows[0]


def test_pos_tags_need_scheme_none_and_get_tag_level_metrics(tmp_path: Path) -> None:
    f = write_conll(tmp_path / "pos.conll", [(["john", "runs"], ["B-PER", "O"])])  # columns: word NN O tag
    with pytest.raises(DataError, match=r"pos.conll:3: tag 'NN' is not valid in scheme iob2 .*set task.scheme"):
        read_tagged(f, tag_column=1)
    out = read_tagged(f, tag_column=1, scheme="none")
    assert out.tags == [["NN", "NN"]]
    m = ner_metrics([["NN", "VBZ", "DT"]], [["NN", "NN", "DT"]], entities=False)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_type"]["VBZ"]["recall"] == 0.0 and m["per_type"]["NN"]["precision"] == 0.5
    assert "strict_f1" not in m
