"""Instruction and chat data: the three common row formats, chat templates, and response-only labels.

Row formats (detected per file from the first row's keys, or forced with ``task.format``):

* ``alpaca``: ``{instruction, input?, output, system?, history?: [[user, assistant], ...]}``; the user turn
  is the instruction, followed by the input after a blank line when there is one;
* ``sharegpt``: ``{conversations: [{from: human|user|gpt|assistant|system, value}], system?}``;
* ``openai``: ``{messages: [{role: system|user|assistant, content}]}``.

Each becomes a list of ``{role, content}`` messages: an optional system message, then user and
assistant turns alternating, ending with an assistant turn. Anything else (unknown role, missing key,
empty assistant text, two user turns in a row) is a `DataError` naming the file and line.

Rendering uses a Jinja chat template: the tokenizer's own, or one of `TEMPLATES` (``alpaca``, ``chatml``,
``plain``). Which tokens are the assistant's is found from the template itself: the text of each
assistant turn is what rendering ``messages[:i + 1]`` adds to rendering ``messages[:i]`` with the
generation prompt (trailing whitespace excluded), so the end-of-turn token (``<|im_end|>``, EOS) is
supervised and the role header is not. The full text is tokenized once, exactly as at inference, and
each token is labelled by where its characters start (fast-tokenizer offsets). A template whose
rendering of a prefix of the conversation is not a prefix of the whole (some templates rewrite earlier
turns) cannot be split this way and is refused with a hint to set ``task.template``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.readers import read_table
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.lm import IGNORE_INDEX

__all__ = [
    "CHAT_FORMATS",
    "TEMPLATES",
    "Conversation",
    "Conversations",
    "encode_conversations",
    "read_conversations",
    "render_with_spans",
    "resolve_template",
]

CHAT_FORMATS = ("alpaca", "sharegpt", "openai")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")

TEMPLATES: dict[str, str] = {
    # Stanford Alpaca's layout, one "### Instruction / ### Response" pair per turn, EOS after each response.
    "alpaca": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n### Response:\n' }}"
        "{% else %}{{ m['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "plain": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}


@dataclass
class Conversation:
    """One example: ``{role, content}`` messages and the 1-based line where its row starts."""

    messages: list[dict[str, str]]
    line: int


@dataclass
class Conversations:
    """The examples of one file, and the row format they were read as."""

    items: list[Conversation]
    source: str
    format: str
    split: str = ""  # "train", "validation", "test" once assigned (for notes)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: Sequence[int]) -> Conversations:
        return Conversations([self.items[i] for i in idx], self.source, self.format, self.split)


# --------------------------------------------------------------------------- reading


def _text(row: dict[str, Any], key: str, where: tuple[Path, int], *, required: bool = True, what: str = "") -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in row else f"{type(value).__name__}, not a string"
        raise DataError(f"{what or repr(key)}: {got}", *where)
    if required and not value.strip():
        raise DataError(f"{what or repr(key)} is empty", *where)
    return value


def _alpaca(row: dict[str, Any], where: tuple[Path, int]) -> list[dict[str, str]]:
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": _text(row, "system", where)})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError("'history' must be a list of [user, assistant] pairs", *where)
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"history[{k}] must be a [user, assistant] pair of strings", *where)
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(row, "instruction", where)
    extra = _text(row, "input", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]


def _turns(row: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str],
           where: tuple[Path, int]) -> list[dict[str, str]]:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"'{key}' must be a non-empty list of messages", *where)
    msgs = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        msgs.append({"role": "system", "content": row["system"]})
    for k, turn in enumerate(turns):
        what = f"{key}[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f"{what} must be an object with '{role_key}' and '{text_key}'", *where)
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"{what}: role {role!r} is not supported (allowed: {', '.join(roles)})", *where)
        msgs.append({"role": roles[role], "content": _text(turn, text_key, where, what=f"{what}.{text_key}")})
    return msgs


def _check(msgs: list[dict[str, str]], where: tuple[Path, int]) -> list[dict[str, str]]:
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for k, m in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"message {k + 1 + len(msgs) - len(body)} is from '{m['role']}', expected '{expected}' "
                            "(after an optional system message, user and assistant turns alternate)", *where)
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"message {k + 1 + len(msgs) - len(body)}: empty assistant text", *where)
    if not body or body[-1]["role"] != "assistant":
        raise DataError("the conversation must end with an assistant turn (that is what is trained)", *where)
    return msgs


def _detect(row: dict[str, Any], where: tuple[Path, int]) -> str:
    for key, fmt in (("messages", "openai"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in row:
            return fmt
    raise DataError(f"cannot tell the chat format from the keys {sorted(row)}: expected 'instruction' (alpaca), "
                    "'conversations' (sharegpt) or 'messages' (openai); or set task.format", *where)


def read_conversations(path: Path, fmt: str = "auto", *, system_prompt: str | None = None,
                       data_format: str | None = None, encoding: str = "utf-8") -> Conversations:
    """Read and validate every row of ``path`` (json, jsonl or parquet) as a conversation."""
    table = read_table(path, data_format, encoding=encoding)
    items: list[Conversation] = []
    for row, line in zip(table.rows, table.lines, strict=True):
        where = (path, line)
        if fmt == "auto":
            fmt = _detect(row, where)
        if fmt == "alpaca":
            msgs = _alpaca(row, where)
        elif fmt == "sharegpt":
            msgs = _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES, where)
        else:
            msgs = _turns(row, "messages", "role", "content", {r: r for r in _ROLES}, where)
        msgs = _check(msgs, where)
        if system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        items.append(Conversation(msgs, line))
    return Conversations(items, str(path), fmt)


# --------------------------------------------------------------------------- templates and labels


def resolve_template(tokenizer: Any, name: str) -> tuple[str, str]:
    """(Jinja template, what it is): ``auto`` = the tokenizer's own, else alpaca; or a named template."""
    if name == "auto":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if isinstance(own, str) and own:
            return own, "the tokenizer's chat template"
        return TEMPLATES["alpaca"], "alpaca (the tokenizer has no chat template)"
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template '{name}'; allowed: auto, {', '.join(TEMPLATES)}", key="task.template")
    return TEMPLATES[name], name


def render_with_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (with its end-of-turn)."""
    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ConfigError("the chat template renders earlier turns differently once later turns follow, so "
                              "assistant tokens cannot be located; set task.template to alpaca, chatml or plain",
                              key="task.template")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def encode_conversations(tokenizer: Any, template: str, convs: Conversations, *, max_length: int,
                         train_on_prompt: bool = False) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """Token ids and labels (``-100`` outside assistant turns unless ``train_on_prompt``), at most ``max_length``.

    Longer examples are truncated at the end; one left without any supervised token is dropped. Returns the
    columns and counts ``{examples, truncated, dropped}``.
    """
    rendered = [render_with_spans(tokenizer, template, c.messages) for c in convs.items]
    enc = tokenizer([r[0] for r in rendered], add_special_tokens=False, return_offsets_mapping=True, verbose=False,
                    return_attention_mask=False)
    cols: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    stats = {"examples": len(rendered), "truncated": 0, "dropped": 0}
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids = np.asarray(ids, dtype=np.int64)
        if train_on_prompt:
            keep = np.ones(len(ids), dtype=bool)
        else:
            starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
            keep = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                keep |= (starts >= a) & (starts < b)
        labels = np.where(keep, ids, IGNORE_INDEX)
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if not (labels[1:] != IGNORE_INDEX).any():
                stats["dropped"] += 1
                continue
        cols["input_ids"].append(ids.tolist())
        cols["labels"].append(labels.tolist())
    return cols, stats
