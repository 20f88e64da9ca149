"""Tokenizer training: special tokens and post-processors per family, loading in plain transformers, exact
byte-level round trips, coverage statistics recomputed by hand, determinism of the BPE trainers, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuneforge.errors import ConfigError
from tuneforge.tokenizers_train import N_SENTINELS, train_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "src" / "tuneforge" / "assets" / "tiny_corpus.txt"
ODD_TEXT = "Naïve café — 東京 😀\ttabs  and   spaces,\nnew lines\r\n and 'quotes' ∑x²"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tiny corpus plus a held-out tail with characters the training part never shows."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    tail = ["ζζζ alpha beta", "gamma ζ delta"]  # the last 5% of lines: held out
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[: 40 - len(tail)] + tail) + "\n", encoding="utf-8")
    return path


def _train(corpus: Path, out: Path, kind: str, family: str, vocab: int = 400):
    report = train_tokenizer([corpus], out, type=kind, family=family, vocab_size=vocab, min_frequency=1)
    return report, AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize(
    ("kind", "family", "single", "pair"),
    [
        ("wordpiece", "bert", ("[CLS]", "[SEP]"), ["[CLS]", "a", "[SEP]", "b", "[SEP]"]),
        ("bytelevel-bpe", "roberta", ("<s>", "</s>"), ["<s>", "a", "</s>", "</s>", "b", "</s>"]),
        ("bytelevel-bpe", "gpt2", (None, None), ["a", "b"]),
        ("bpe", "llama", ("<s>", None), ["<s>", "a", "<s>", "b"]),
        ("bytelevel-bpe", "t5", (None, "</s>"), ["a", "</s>", "b", "</s>"]),
    ],
)
def test_family_special_tokens_and_post_processor(tmp_path: Path, corpus: Path, kind: str, family: str,
                                                  single: tuple, pair: list[str]) -> None:
    report, tok = _train(corpus, tmp_path / "tok", kind, family)
    ids = tok("the river").input_ids
    first, last = tok.convert_ids_to_tokens([ids[0], ids[-1]])
    assert (first if single[0] else None) == single[0]
    assert (last if single[1] else None) == single[1]
    plain = tok("the river", add_special_tokens=False).input_ids
    assert len(ids) - len(plain) == sum(x is not None for x in single)
    # the pair template, with each text replaced by a marker
    a = tok("the", add_special_tokens=False).input_ids
    b = tok("river", add_special_tokens=False).input_ids
    got = tok("the", "river").input_ids
    expected = [t for name in pair for t in ({"a": a, "b": b}.get(name) or tok.convert_tokens_to_ids([name]))]
    assert got == expected
    assert len(tok) == report.vocab_size
    assert tok.pad_token_id is not None or family == "gpt2"


def test_t5_family_has_100_sentinels_at_the_top(tmp_path: Path, corpus: Path) -> None:
    report, tok = _train(corpus, tmp_path / "t5", "bytelevel-bpe", "t5", vocab=500)
    assert len(tok) == 500 == report.vocab_size
    ids = tok.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(N_SENTINELS)])
    assert ids == list(range(499, 399, -1))  # <extra_id_0> is the last id, as in T5's vocabulary
    assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2]
    assert tok.decode(tok("a <extra_id_3> b", add_special_tokens=False).input_ids) == "a <extra_id_3> b"


@pytest.mark.parametrize("family", ["gpt2", "roberta", "llama"])
def test_byte_level_round_trips_any_text_exactly(tmp_path: Path, corpus: Path, family: str) -> None:
    report, tok = _train(corpus, tmp_path / "bl", "bytelevel-bpe", family)
    for text in (ODD_TEXT, "  leading and trailing  ", "ζζζ alpha beta", "x" * 300):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    assert report.unk_rate == 0.0
    assert report.exact_roundtrip == 1.0


def test_coverage_statistics_match_a_recount(tmp_path: Path, corpus: Path) -> None:
    report, tok = _train(corpus, tmp_path / "wp", "wordpiece", "bert", vocab=300)
    heldout = ["ζζζ alpha beta", "gamma ζ delta"]
    assert report.heldout_documents == 2 and report.train_documents == 38
    ids = [tok(t, add_special_tokens=False).input_ids for t in heldout]
    n = sum(map(len, ids))
    assert report.unk_rate == pytest.approx(sum(x.count(tok.unk_token_id) for x in ids) / n)
    assert report.unk_rate >= 2 / n  # both held-out lines contain a word with the unseen 'ζ'
    assert report.tokens_per_word == pytest.approx(n / 6)
    assert report.chars_per_token == pytest.approx(sum(map(len, heldout)) / n)
    saved = json.loads((tmp_path / "wp" / "tokenizer_train.json").read_text())
    assert saved["unk_rate"] == report.unk_rate and saved["lowercase"] is True


@pytest.mark.parametrize("kind", ["bytelevel-bpe", "bpe"])
def test_bpe_trainers_are_deterministic(tmp_path: Path, corpus: Path, kind: str) -> None:
    _train(corpus, tmp_path / "a", kind, "llama")
    _train(corpus, tmp_path / "b", kind, "llama")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_unigram_trains_and_loads(tmp_path: Path, corpus: Path) -> None:
    report, tok = _train(corpus, tmp_path / "uni", "unigram", "t5", vocab=400)
    assert len(tok) == 400
    text = CORPUS.read_text(encoding="utf-8").splitlines()[0]  # a trained line: every character is known
    ids = tok(text).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert 0 < report.unk_rate < 0.2  # the held-out lines have unseen characters


@pytest.mark.parametrize(
    ("kwargs", "key", "needle"),
    [
        ({"type": "sentencepiece"}, "--type", "allowed: bytelevel-bpe, bpe, wordpiece, unigram"),
        ({"family": "bart"}, "--family", "allowed: bert, roberta, gpt2, llama, t5"),
        ({"vocab_size": 200, "family": "t5"}, "--vocab-size", "at least 359"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, corpus: Path, kwargs: dict, key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        train_tokenizer([corpus], tmp_path / "x", **kwargs)
    assert info.value.key == key and needle in str(info.value)
    assert not (tmp_path / "x").exists()


def test_cli_train_accepts_several_files(tmp_path: Path, corpus: Path) -> None:
    from typer.testing import CliRunner

    from tuneforge.cli import app

    other = tmp_path / "more.jsonl"
    other.write_text('{"text": "a jsonl document about the river"}\n' * 3, encoding="utf-8")
    out = tmp_path / "cli-tok"
    result = CliRunner().invoke(app, ["tokenizer", "train", "--type", "bytelevel-bpe", "--vocab-size", "400",
                                      "--files", str(corpus), str(other), "--out", str(out), "--min-frequency", "1"])
    assert result.exit_code == 0, result.output
    assert "unknown-token rate 0.000%" in result.output and "tokens/word" in result.output
    saved = json.loads((out / "tokenizer_train.json").read_text())
    assert saved["files"] == [str(corpus), str(other)] and saved["train_documents"] == 38 + 3
    assert AutoTokenizer.from_pretrained(out).decode(AutoTokenizer.from_pretrained(out)("river").input_ids) == "river"
