"""Instruction/chat data: the three row formats, line-numbered errors, templates, and response-only labels
(the supervised tokens decode to exactly the assistant turns plus their end-of-turn token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuneforge.data.chat import TEMPLATES, encode_conversations, read_conversations, resolve_template
from tuneforge.errors import ConfigError, DataError
from tuneforge.models import resolve_model

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


GOOD = [
    {"instruction": "hi", "output": "hello"},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
]


def _write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama_tok():
    return AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of supervised token ids."""
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [*runs, cur] if cur else runs


def test_the_three_formats_read_to_the_same_messages(tmp_path: Path) -> None:
    openai = _jsonl(tmp_path / "o.jsonl", [{"messages": CHAT}])
    sharegpt = _write_json(tmp_path / "s.json", [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": CHAT[1]["content"]}, {"from": "gpt", "value": CHAT[2]["content"]},
        {"from": "human", "value": CHAT[3]["content"]}, {"from": "gpt", "value": CHAT[4]["content"]}]}])
    alpaca = _write_json(tmp_path / "a.json", [{"system": "Be brief.", "instruction": "And of", "input": "Italy?",
                                                "output": CHAT[4]["content"], "history": [[CHAT[1]["content"], CHAT[2]["content"]]]}])
    for path, fmt in ((openai, "openai"), (sharegpt, "sharegpt"), (alpaca, "alpaca")):
        convs = read_conversations(path)
        assert convs.format == fmt
        msgs = convs.items[0].messages
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
        assert msgs[2]["content"] == "Paris is the capital."
    assert read_conversations(alpaca).items[0].messages[3]["content"] == "And of\n\nItaly?"
    # task.system_prompt fills in only where a conversation has none
    plain = _jsonl(tmp_path / "p.jsonl", [{"instruction": "hi", "output": "hello"}])
    assert read_conversations(plain, system_prompt="S").items[0].messages[0] == {"role": "system", "content": "S"}
    assert read_conversations(openai, system_prompt="S").items[0].messages[0]["content"] == "Be brief."


@pytest.mark.parametrize(("row", "message"), [
    ({"instruction": "x"}, "'output': missing"),
    ({"instruction": "x", "output": "  "}, "'output' is empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "role 'tool' is not supported"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, r"messages\[1\].content is empty"),
    ({"instruction": "x", "output": "y", "history": [["q", " "]]}, "message 2: empty assistant text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "must end with an assistant turn"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}, r"conversations\[1\].value: missing"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}, "value is empty"),
])
def test_malformed_rows_name_file_and_line(tmp_path: Path, row: dict, message: str) -> None:
    good = next(g for g in GOOD if next(iter(g)) in row)
    path = _jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError, match=message) as err:
        read_conversations(path)
    assert err.value.line == 3 and err.value.path == str(path)


def test_unknown_row_shape_is_reported_with_the_expected_keys(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot tell the chat format.*'instruction' \(alpaca\)") as err:
        read_conversations(_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}]))
    assert err.value.line == 1


def test_json_array_errors_point_at_the_record_line(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "a.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError) as err:
        read_conversations(path)
    lines = path.read_text().splitlines()
    assert '"instruction": "c"' in lines[err.value.line]  # the record's '{' line is followed by its first key


@pytest.mark.parametrize(("template", "end"), [("alpaca", "</s>"), ("chatml", "<|im_end|>"), ("plain", "</s>")])
def test_supervised_tokens_are_exactly_the_assistant_turns(tmp_path: Path, llama_tok, template: str, end: str) -> None:
    convs = read_conversations(_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    text, _ = resolve_template(llama_tok, template)
    cols, stats = encode_conversations(llama_tok, text, convs, max_length=512)
    assert stats == {"examples": 1, "truncated": 0, "dropped": 0}
    runs = [llama_tok.decode(r) for r in _runs(cols["input_ids"][0], cols["labels"][0])]
    lead = " " if template == "plain" else ""  # "Assistant:" + " Paris": the space starts the first answer token
    assert runs == [lead + "Paris is the capital." + end, lead + "Rome, since 1871." + end]
    # the rendered prompt is what inference renders: the same ids as the template applied by transformers
    full = llama_tok.apply_chat_template(CHAT, chat_template=text, tokenize=False)
    assert cols["input_ids"][0] == llama_tok(full, add_special_tokens=False)["input_ids"]


def test_train_on_prompt_supervises_everything(tmp_path: Path, llama_tok) -> None:
    convs = read_conversations(_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    cols, _ = encode_conversations(llama_tok, TEMPLATES["alpaca"], convs, max_length=512, train_on_prompt=True)
    assert cols["labels"][0] == cols["input_ids"][0]


def test_truncation_and_dropping_are_counted(tmp_path: Path, llama_tok) -> None:
    long_answer = {"instruction": "short", "output": "word " * 200}
    long_prompt = {"instruction": "word " * 200, "output": "ok"}
    fits = {"instruction": "short", "output": "fine"}
    convs = read_conversations(_jsonl(tmp_path / "c.jsonl", [long_answer, long_prompt, fits]))
    cols, stats = encode_conversations(llama_tok, TEMPLATES["alpaca"], convs, max_length=64)
    assert stats == {"examples": 3, "truncated": 2, "dropped": 1}
    assert len(cols["input_ids"][0]) == 64
    assert len(cols["input_ids"]) == 2


def test_auto_template_falls_back_to_alpaca_and_named_templates_are_checked(llama_tok) -> None:
    text, what = resolve_template(llama_tok, "auto")
    assert text == TEMPLATES["alpaca"] and "no chat template" in what
    with pytest.raises(ConfigError, match="allowed: auto, alpaca, chatml, plain"):
        resolve_template(llama_tok, "vicuna")


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path, llama_tok) -> None:
    # renders only the last assistant turn in full (like templates that strip earlier reasoning)
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[..]"
                 "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    convs = read_conversations(_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    with pytest.raises(ConfigError, match=r"task\.template"):
        encode_conversations(llama_tok, rewriting, convs, max_length=512)
