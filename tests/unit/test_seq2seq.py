"""task: seq2seq: metrics against sacrebleu / rouge-score, reading and collation, the teacher-forced loss against
transformers' own, greedy generation against plain ``generate``, and learning a toy translation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.config.schema import TextPair
from tuneforge.data.seq2seq import Seq2SeqBatches, Seq2SeqRecords, encode_pairs, read_pairs
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.seq2seq import bleu, generation_metrics, rouge, sentences
from tuneforge.models.registry import resolve_model

HYPS = ["the cat sat on the mat", "a dog runs in the park today", "papers describe new methods."]
REFS = [["the cat is on the mat", "there is a cat on the mat"], ["a dog is running in the park"],
        ["the paper describes a new method. it is fast."]]

# a toy "translation": each source word maps to one target word
LEXICON = {"rot": "red", "blau": "blue", "katze": "cat", "hund": "dog", "haus": "house", "baum": "tree",
           "gross": "big", "klein": "small"}


def toy_rows(n: int, seed: int) -> list[dict[str, str]]:
    import random

    rng, words = random.Random(seed), sorted(LEXICON)
    rows = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(2, 4))]
        rows.append({"source": " ".join(src), "target": " ".join(LEXICON[w] for w in src)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ metrics
def test_bleu_equals_sacrebleu_with_several_references() -> None:
    import sacrebleu

    score, signature = bleu(HYPS, REFS)
    streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    assert score == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score, abs=1e-9)
    assert signature.startswith("nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:")  # 2 or 1 references
    single, _ = bleu(HYPS, [r[:1] for r in REFS])
    assert single == pytest.approx(sacrebleu.corpus_bleu(HYPS, [[r[0] for r in REFS]]).score, abs=1e-9)


def test_rouge_equals_rouge_score_best_reference_mean() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    got = rouge(HYPS, REFS)
    for key in got:
        want = sum(max(scorer.score(sentences(r), sentences(h))[key].fmeasure for r in refs)
                   for h, refs in zip(HYPS, REFS, strict=True)) / len(HYPS)
        assert got[key] == pytest.approx(want, abs=1e-12), key
    # rougeLsum reads sentences: the split puts the second sentence on its own line
    assert sentences("one. two! three? four") == "one.\ntwo!\nthree?\nfour"
    # stemming: "describe" vs "describes" match only with the stemmer
    assert rouge(["describes"], [["describe"]])["rouge1"] == 1.0
    assert rouge(["describes"], [["describe"]], stemming=False)["rouge1"] == 0.0


def test_identical_texts_give_bleu_100_and_rouge_1() -> None:
    m = generation_metrics([r[0] for r in REFS], REFS)
    assert m["bleu"] == pytest.approx(100.0)
    assert all(m[k] == pytest.approx(1.0) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))


# ------------------------------------------------------------------ reading
def test_line_aligned_gzip_pairs_and_table_lists(tmp_path: Path) -> None:
    src, tgt = tmp_path / "train.de.gz", tmp_path / "train.en.gz"
    src.write_bytes(gzip.compress(b"ein hund\nzwei katzen\n"))
    tgt.write_bytes(gzip.compress(b"a dog\ntwo cats\n"))
    recs = read_pairs(TextPair(source=src, target=tgt), source_column="source", target_column="target")
    assert recs.sources == ["ein hund", "zwei katzen"] and recs.targets == [["a dog"], ["two cats"]]
    # SciTLDR layout: the source is a list of sentences, the target a list of references
    f = write_jsonl(tmp_path / "tldr.jsonl", [{"source": ["First one.", "Second."], "target": ["a", "b"]}])
    recs = read_pairs(f, source_column="source", target_column="target")
    assert recs.sources == ["First one. Second."] and recs.targets == [["a", "b"]]


def test_bad_pairs_name_file_and_line(tmp_path: Path) -> None:
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("a\nb\nc\n", encoding="utf-8")
    tgt.write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(DataError, match="more lines") as info:
        read_pairs(TextPair(source=src, target=tgt), source_column="source", target_column="target")
    assert str(src) in str(info.value) and ":3" in str(info.value)
    tgt.write_text("x\n\nz\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty target line") as info:
        read_pairs(TextPair(source=src, target=tgt), source_column="source", target_column="target")
    assert f"{tgt}:2" in str(info.value)
    f = write_jsonl(tmp_path / "t.jsonl", [{"source": "a", "target": "b"}, {"source": "c", "target": " "}])
    with pytest.raises(DataError, match="empty target") as info:
        read_pairs(f, source_column="source", target_column="target")
    assert f"{f}:2" in str(info.value)


def test_config_refuses_pairs_for_other_tasks_and_a_model_without_decoder() -> None:
    with pytest.raises(ConfigError, match="file pairs are read by task seq2seq") as info:
        load_config(None, ["data.train.source=a.de", "data.train.target=a.en"])
    assert info.value.key == "data.train"
    with pytest.raises(ConfigError, match="builds an encoder-decoder") as info:
        load_config(None, ["model.architecture=bert2bert"])
    assert info.value.key == "model.architecture"
    with pytest.raises(ConfigError, match=r"needs model\.init=pretrained"):
        load_config(None, ["task=seq2seq", "model.init=scratch", "model.architecture=bert2bert", "model.tokenizer=x"])


# ------------------------------------------------------------------ collation and the loss
def _t5():
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    path = resolve_model("tiny-t5")
    return T5ForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_collation_pads_labels_with_minus_100_and_targets_may_be_longer() -> None:
    from tuneforge.objectives.seq2seq import _shift_right, seq2seq_forward

    model, tok = _t5()
    recs = Seq2SeqRecords(["a", "the cat sat on the mat"], [["the dog ran to the park and slept in the sun"], ["b"]], "x")
    cols, stats = encode_pairs(tok, recs, prefix="", max_source=32, max_target=32, decoder_start=0,
                               every_reference=False)
    assert stats == {"examples": 2, "sources_truncated": 0, "targets_truncated": 0}
    batch = Seq2SeqBatches(cols, tok.pad_token_id).collate([0, 1])
    assert batch["labels"].shape[1] > batch["input_ids"].shape[1]  # the first target is longer than any source
    n0, n1 = len(cols["labels"][0]), len(cols["labels"][1])
    assert batch["labels"][1, n1:].eq(-100).all() and batch["labels"][0].ne(-100).all()
    assert cols["labels"][0][-1] == tok.eos_token_id
    assert batch["attention_mask"].sum(1).tolist() == [len(x) for x in cols["input_ids"]]
    dec = _shift_right(batch["labels"], model.config.decoder_start_token_id, tok.pad_token_id)
    assert dec[:, 0].eq(model.config.decoder_start_token_id).all()
    assert torch.equal(dec[0, 1:n0], batch["labels"][0, : n0 - 1]) and dec[1, n1 + 1 :].eq(tok.pad_token_id).all()
    # our loss (output layer on real target positions only) equals transformers' own labels loss
    with torch.no_grad():
        out = seq2seq_forward(model, batch)
        ours = torch.nn.functional.cross_entropy(out.logits, out.targets)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert out.logits.shape[0] == n0 + n1
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)


def test_bert_targets_drop_the_leading_cls_that_starts_the_decoder() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))
    recs = Seq2SeqRecords(["a cat"], [["the dog"]], "x")
    cols, _ = encode_pairs(tok, recs, prefix="", max_source=16, max_target=3, decoder_start=tok.cls_token_id,
                           every_reference=True)
    assert cols["input_ids"][0][0] == tok.cls_token_id  # the encoder keeps [CLS]
    assert cols["labels"][0][0] != tok.cls_token_id and cols["labels"][0][-1] == tok.sep_token_id
    assert len(cols["labels"][0]) <= 3  # truncation keeps [SEP] at the end


# ------------------------------------------------------------------ training, saving, generating
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuneforge.pipeline import train

    d = tmp_path_factory.mktemp("seq2seq")
    write_jsonl(d / "train.jsonl", toy_rows(400, 0))
    write_jsonl(d / "val.jsonl", toy_rows(40, 1))
    # a T5 from scratch around the tiny T5's tokenizer, 64 wide (the registry's 32-wide tiny-t5 learns too slowly)
    run = load_config(None, [
        "task=seq2seq", "model.init=scratch", "model.architecture=t5", f"model.tokenizer={resolve_model('tiny-t5')}",
        "model.size=tiny", "model.hidden=64", f"data.train={d / 'train.jsonl'}", f"data.validation={d / 'val.jsonl'}",
        "train.max_steps=200", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=10",
        "train.precision=fp32", "train.eval_steps=200", "train.tensorboard=false", "task.num_beams=1",
        "task.max_new_tokens=12", "train.seed=0", f"output_dir={d / 'run'}", "train.eval_on_start=true"])
    return train(run, quiet=True).run_dir


def test_training_learns_the_toy_translation(toy_run: Path) -> None:
    from tuneforge.track import read_metrics

    metrics = json.loads((toy_run / "metrics.json").read_text(encoding="utf-8"))
    val = metrics["splits"]["validation"]
    evals = [r for r in read_metrics(toy_run) if r.get("split") == "eval"]
    assert evals[0]["loss"] > 4.0 and val["loss"] < evals[0]["loss"] - 2.0  # from chance to well below
    assert "bleu" not in evals[0]  # evaluations during training report the loss only (generate_eval default)
    assert val["bleu"] > 10.0 and val["rouge1"] > 0.7, val  # the final evaluation generates (fp32: deterministic)
    assert val["bleu_signature"].startswith("nrefs:1|")


def test_greedy_generation_equals_plain_transformers(toy_run: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from tuneforge.engine import Runtime
    from tuneforge.objectives.seq2seq import generate_targets

    folder = toy_run / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    sources = [r["source"] for r in toy_rows(6, 7)]
    cfg = load_config(toy_run / "config.yaml").task
    ours = generate_targets(model, tok, sources, cfg, max_source=128, batch_size=4, runtime=Runtime.cpu())
    for src, got in zip(sources, ours, strict=True):
        enc = tok(src, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=12, num_beams=1, do_sample=False)
        assert got == tok.decode(ids[0], skip_special_tokens=True).strip()
