"""Preference data: every row shape, skipped and malformed rows, the shared files, tokenization and batching."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from tuneforge.data.preference import read_preferences
from tuneforge.errors import DataError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_prompt_chosen_rejected_strings_and_message_lists(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "system": "Be kind."},
        {"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": {"role": "assistant", "content": "bad"}},
    ]
    prefs = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    a, b = prefs.items
    assert prefs.paired and a.prompt == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"}]
    assert (a.chosen, a.rejected, a.line) == ("Hi!", "No.", 1)
    assert [m["role"] for m in b.prompt] == ["user", "assistant", "user"] and (b.chosen, b.rejected) == ("good", "bad")


def test_sharegpt_and_hh_transcripts(tmp_path: Path) -> None:
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hello"}],
             "chosen": {"from": "gpt", "value": "hi there"}, "rejected": {"from": "gpt", "value": "go away"}}
    hh = {"chosen": "\n\nHuman: How are you?\n\nAssistant: Fine.\n\nHuman: Sure?\n\nAssistant: Yes, thanks.",
          "rejected": "\n\nHuman: How are you?\n\nAssistant: Fine.\n\nHuman: Sure?\n\nAssistant: Leave me alone."}
    a, b = read_preferences(write_jsonl(tmp_path / "p.jsonl.gz", [share, hh])).items
    assert a.prompt == [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"}]
    assert (a.chosen, a.rejected) == ("hi there", "go away")
    assert b.prompt == [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."},
                        {"role": "user", "content": "Sure?"}]
    assert (b.chosen, b.rejected, b.line) == ("Yes, thanks.", "Leave me alone.", 2)


def test_unpaired_kto_rows(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True},
            {"prompt": "q2", "completion": "a2", "label": False}]
    prefs = read_preferences(write_jsonl(tmp_path / "k.jsonl", rows))
    assert not prefs.paired
    assert [(p.chosen, p.rejected, p.label) for p in prefs.items] == [("a", None, True), ("a2", None, False)]
    with pytest.raises(DataError, match=r"k\.jsonl:1: expected chosen/rejected pairs"):
        read_preferences(tmp_path / "k.jsonl", paired=True)


def test_identical_pairs_are_skipped_and_counted_and_margins_read(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "x", "rejected": "x", "margin": 1},
            {"prompt": "p", "chosen": "x", "rejected": "y", "margin": 2.5}]
    prefs = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows), margin_key="margin")
    assert len(prefs) == 1 and prefs.items[0].margin == 2.5 and prefs.items[0].line == 2
    assert prefs.skipped["chosen == rejected"] == 1 and "1 chosen == rejected" in prefs.skipped_note()


def test_csv_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("prompt", "chosen", "rejected"), ("hi", "hello", "go"), ("q", "a", "b")])
    prefs = read_preferences(path)
    assert [(p.prompt[0]["content"], p.chosen, p.line) for p in prefs.items] == [("hi", "hello", 2), ("q", "a", 3)]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "chosen": "c"}, "the pair has no 'rejected' response"),
    ({"prompt": "p", "chosen": " ", "rejected": "r"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "margin column 'margin'"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "differ before"),
    ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "reply is empty"),
    ({"chosen": "just text", "rejected": "other"}, "not an hh-rlhf transcript"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, row: dict, message: str) -> None:
    good = {"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1.0}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{message}") as err:
        read_preferences(path, margin_key="margin" if "margin" in row else None)
    assert err.value.line == 2
    if "margin" not in row:  # under invalid=skip the row is skipped and counted instead
        prefs = read_preferences(path, invalid="skip")
        assert len(prefs) == 1 and prefs.skipped["malformed"] == 1 and "line 2" in prefs.skipped_note()


def test_shared_files(shared_data: Path) -> None:
    root = shared_data / "preference"
    demo = read_preferences(root / "dpo_en_demo.json")
    assert len(demo) == 300 and demo.paired and all(p.prompt[-1]["role"] == "user" for p in demo.items)
    kto = read_preferences(root / "kto_en_demo.json")
    assert len(kto) == 300 and not kto.paired and sum(p.label for p in kto.items) == 150
    with pytest.raises(DataError, match=r"hh_rlhf_train\.jsonl\.gz:553: 'rejected': the last assistant reply is empty"):
        read_preferences(root / "hh_rlhf_train.jsonl.gz")
    hh = read_preferences(root / "hh_rlhf_train.jsonl.gz", invalid="skip")
    assert hh.skipped["chosen == rejected"] == 34 and hh.skipped["malformed"] == 16 and len(hh) == 5386 - 50


# --------------------------------------------------------------------------- tokenization and batches


@pytest.fixture(scope="module")
def llama_tokenizer():
    from transformers import AutoTokenizer

    from tuneforge.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def test_only_response_tokens_are_labelled_and_truncation_is_counted(tmp_path: Path, llama_tokenizer) -> None:
    from tuneforge.data.chat import TEMPLATES
    from tuneforge.data.pairs import PairBatches, encode_responses
    from tuneforge.eval.lm import IGNORE_INDEX

    tok = llama_tokenizer
    rows = [{"prompt": "the cat sat", "chosen": "on the mat", "rejected": "under a very long table of wood"},
            {"prompt": " ".join(["word"] * 60), "chosen": "yes", "rejected": "no"}]
    prefs = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    cols, stats = encode_responses(tok, TEMPLATES["chatml"], prefs, max_length=120, max_prompt_length=60)
    assert stats["prompt_truncated"] == 1 and stats["examples"] == 2 and cols["keep"] == [0, 1]
    for side, text in (("chosen", "on the mat"), ("rejected", "under a very long table of wood")):
        ids, labels = cols[f"{side}_input_ids"][0], cols[f"{side}_labels"][0]
        scored = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        assert tok.decode(scored) == text + "<|im_end|>"  # the reply and its end-of-turn, no role header
    assert len(cols["chosen_input_ids"][1]) <= 120
    assert sum(lab != IGNORE_INDEX for lab in cols["chosen_labels"][1]) > 0
    # the long prompt kept its end (next to the reply): the generation header is still there
    assert tok.decode(cols["chosen_input_ids"][1]).rstrip().endswith("<|im_start|>assistant\nyes<|im_end|>")
    _, cut = encode_responses(tok, TEMPLATES["chatml"], prefs, max_length=45, max_prompt_length=40)
    assert cut["response_truncated"] >= 1

    data = PairBatches({k: v for k, v in cols.items() if k != "keep"}, ("chosen", "rejected"), tok.pad_token_id)
    batch = data.collate([0, 1])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["attention_mask"][0].sum() == len(cols["chosen_input_ids"][0])  # row 0: pair 0 chosen
    assert batch["attention_mask"][2].sum() == len(cols["rejected_input_ids"][0])  # row 2: pair 0 rejected


# --------------------------------------------------------------------------- synthetic pairs (other tests use these)

THINGS = ["movie", "book", "meal", "song", "phone", "car", "game", "show"]
GOOD = ["great", "wonderful", "lovely", "excellent"]
BAD = ["awful", "terrible", "boring", "dreadful"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` {prompt, chosen, rejected} rows: chosen praises, rejected pans; random padding words on either side
    make the longer response the chosen one about half the time (the length baseline is near 0.5)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        thing = THINGS[i % len(THINGS)]
        pad = lambda: " really" * rng.randint(0, 3)  # noqa: E731
        rows.append({"prompt": f"what do you think of the {thing}?",
                     "chosen": f"the {thing} was{pad()} {rng.choice(GOOD)}",
                     "rejected": f"the {thing} was{pad()} {rng.choice(BAD)}"})
    return rows


def synthetic_unpaired(n: int, seed: int = 0) -> list[dict]:
    """``n`` KTO rows {prompt, completion, label}: praise is desirable, panning is not (alternating)."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(synthetic_pairs(n, seed))]
