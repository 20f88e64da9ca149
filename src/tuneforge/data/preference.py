"""Preference data: chosen/rejected response pairs (reward models, DPO) and unpaired labelled responses (KTO).

Each row becomes a `Preference`: the prompt as ``{role, content}`` messages ending with a user turn, and the
assistant response(s) as text. Row shapes, told apart per row by their keys:

* ``{prompt, chosen, rejected}``: the prompt a string (one user turn) or a message list (``role/content``
  or ShareGPT ``from/value``); each response a string, one assistant message, or a one-message list;
  an optional ``system`` string;
* ShareGPT ``{conversations, chosen, rejected}`` (LLaMA-Factory's ``dpo_en_demo.json``): the conversation
  is the prompt, ``chosen``/``rejected`` are ``{from: gpt, value}`` messages (or strings);
* ``{chosen, rejected}`` alone, the Anthropic hh-rlhf shape: two full transcripts
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings, or message lists) that share every turn but the last
  assistant one, which is split off as the response; the shared turns are the prompt;
* unpaired (KTO, Ethayarajh et al. 2024): ``{messages, label}`` (the last assistant message is the
  completion) or ``{prompt, completion, label}``, ``label`` a boolean (desirable or not).

A numeric ``margin`` column (``margin_key``) is read per pair when asked for (reward models, Touvron et al.
2023's margin loss). A pair whose chosen equals its rejected response carries no signal: it is skipped
and counted. A missing field, an empty response or a malformed transcript is a `DataError` naming the file
and line; with ``invalid="skip"`` such rows are skipped and counted by reason instead (real hh-rlhf
data has a few transcripts whose two sides differ before their last turn or end on an empty reply).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.readers import read_table
from tuneforge.errors import DataError

__all__ = ["Preference", "Preferences", "read_preferences"]

_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
               "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Preference:
    """One example: the prompt messages and either a chosen/rejected pair or one labelled completion.

    Attributes:
        prompt: ``{role, content}`` messages (an optional system message, then user/assistant turns
            alternating), ending with a user turn.
        chosen: the preferred response (paired) or the completion (unpaired).
        rejected: the dispreferred response; None for an unpaired example.
        label: unpaired only: the completion is desirable (True) or not.
        margin: how much better chosen is (optional ``margin`` column), else None.
        line: the 1-based line where the row starts.
    """

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str | None
    line: int
    label: bool | None = None
    margin: float | None = None


@dataclass
class Preferences:
    """The examples of one file, how many rows were skipped and why, and the split they became."""

    items: list[Preference]
    source: str
    paired: bool
    skipped: Counter = field(default_factory=Counter)
    split: str = ""
    malformed: list[str] = field(default_factory=list)  # the first few skipped malformed rows, with why

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: Sequence[int]) -> Preferences:
        return Preferences([self.items[i] for i in idx], self.source, self.paired, self.skipped, self.split,
                           self.malformed)

    def skipped_note(self) -> str:
        """``"skipped: 34 chosen == rejected, ..."`` or "" when nothing was skipped."""
        if not self.skipped:
            return ""
        note = "skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return note + (f" (first: {'; '.join(self.malformed)})" if self.malformed else "")


class _Skip(Exception):
    """A row that carries no signal (skipped and counted, never an error)."""


# --------------------------------------------------------------------------- fields


def _text(value: Any, what: str, where: tuple[Path, int]) -> str:
    if not isinstance(value, str):
        got = "missing" if value is None else f"{type(value).__name__}, not a string"
        raise DataError(f"{what}: {got}", *where)
    if not value.strip():
        raise DataError(f"{what} is empty", *where)
    return value


def _message(turn: Any, what: str, where: tuple[Path, int]) -> dict[str, str]:
    """A ``role/content`` or ShareGPT ``from/value`` message as ``{role, content}``."""
    if not isinstance(turn, dict):
        raise DataError(f"{what} must be an object with 'role' and 'content' (or 'from' and 'value')", *where)
    role_key, text_key = ("role", "content") if "role" in turn else ("from", "value")
    role = turn.get(role_key)
    if role not in _ROLE_NAMES:
        raise DataError(f"{what}: role {role!r} is not supported (allowed: {', '.join(_ROLE_NAMES)})", *where)
    return {"role": _ROLE_NAMES[role], "content": _text(turn.get(text_key), f"{what}.{text_key}", where)}


def _messages(value: Any, what: str, where: tuple[Path, int]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"'{what}' must be a non-empty list of messages", *where)
    return [_message(t, f"{what}[{k}]", where) for k, t in enumerate(value)]


def _response(value: Any, what: str, where: tuple[Path, int]) -> str:
    """A response: a string, one assistant message, or a list holding one assistant message."""
    if value is None:
        raise DataError(f"'{what}' is missing", *where)
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"'{what}' must hold exactly one assistant message, got {len(value)}", *where)
        value = value[0]
    if isinstance(value, dict):
        msg = _message(value, what, where)
        if msg["role"] != "assistant":
            raise DataError(f"'{what}' must be an assistant message, not '{msg['role']}'", *where)
        return msg["content"]
    return _text(value, f"'{what}'", where)


def _check_prompt(msgs: list[dict[str, str]], where: tuple[Path, int]) -> list[dict[str, str]]:
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for k, m in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"prompt message {k + 1 + len(msgs) - len(body)} is from '{m['role']}', expected "
                            f"'{expected}' (after an optional system message, user and assistant turns alternate)",
                            *where)
    if not body or body[-1]["role"] != "user":
        raise DataError("the prompt must end with a user turn (the responses answer it)", *where)
    return msgs


def _with_system(row: dict[str, Any], msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (msgs and msgs[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *msgs]
    return msgs


# --------------------------------------------------------------------------- shapes


def _prompt_of(row: dict[str, Any], where: tuple[Path, int]) -> list[dict[str, str]]:
    if "conversations" in row:
        msgs = _messages(row["conversations"], "conversations", where)
    else:
        p = row.get("prompt")
        msgs = _messages(p, "prompt", where) if isinstance(p, list) else \
            [{"role": "user", "content": _text(p, "'prompt'", where)}]
    return _check_prompt(_with_system(row, msgs), where)


def _transcript(value: Any, what: str, where: tuple[Path, int]) -> list[dict[str, str]]:
    """A full conversation: a message list, or an hh-rlhf ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` string."""
    if isinstance(value, list):
        return _messages(value, what, where)
    if not isinstance(value, str):
        raise DataError(f"'{what}' must be a transcript string or a message list", *where)
    parts = _HH_TURN.split(value)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"'{what}' is not an hh-rlhf transcript (turns starting '\\n\\nHuman:' / "
                        "'\\n\\nAssistant:'), and the row has no 'prompt' or 'conversations'", *where)
    return [{"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
            for i in range(1, len(parts), 2)]


def _implicit(row: dict[str, Any], where: tuple[Path, int]) -> tuple[list[dict[str, str]], str, str]:
    """Split two full transcripts into the shared prompt and the two last assistant replies."""
    chosen, rejected = (_transcript(row[k], k, where) for k in ("chosen", "rejected"))
    for what, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"'{what}' does not end with an assistant reply", *where)
        if not msgs[-1]["content"].strip():
            raise DataError(f"'{what}': the last assistant reply is empty", *where)
    if chosen[:-1] != rejected[:-1]:
        raise DataError("'chosen' and 'rejected' differ before their last assistant reply, so no shared prompt "
                        "can be split off", *where)
    prompt = _check_prompt(_with_system(row, chosen[:-1]), where)
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def _margin(row: dict[str, Any], key: str | None, where: tuple[Path, int]) -> float | None:
    if key is None:
        return None
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        got = "missing" if value is None else repr(value)
        raise DataError(f"margin column '{key}': {got}, expected a number", *where)
    return float(value)


def _paired(row: dict[str, Any], where: tuple[Path, int], margin_key: str | None) -> Preference:
    if "chosen" not in row or "rejected" not in row:
        missing = "chosen" if "chosen" not in row else "rejected"
        raise DataError(f"the pair has no '{missing}' response (keys: {', '.join(sorted(row))})", *where)
    if "prompt" in row or "conversations" in row:
        prompt = _prompt_of(row, where)
        chosen, rejected = _response(row["chosen"], "chosen", where), _response(row["rejected"], "rejected", where)
    else:
        prompt, chosen, rejected = _implicit(row, where)
    if chosen == rejected:
        raise _Skip("chosen == rejected")
    return Preference(prompt, chosen, rejected, where[1], margin=_margin(row, margin_key, where))


def _unpaired(row: dict[str, Any], where: tuple[Path, int]) -> Preference:
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"'label' must be true or false (desirable or not), got {label!r}", *where)
    if "messages" in row:
        msgs = _with_system(row, _messages(row["messages"], "messages", where))
        if msgs[-1]["role"] != "assistant":
            raise DataError("'messages' must end with the assistant completion that is labelled", *where)
        prompt, completion = _check_prompt(msgs[:-1], where), msgs[-1]["content"]
    elif "prompt" in row:
        prompt, completion = _prompt_of(row, where), _response(row.get("completion"), "completion", where)
    else:
        raise DataError(f"an unpaired example needs 'messages' or 'prompt' and 'completion' (keys: "
                        f"{', '.join(sorted(row))})", *where)
    return Preference(prompt, completion, None, where[1], label=label)


def read_preferences(path: Path, *, data_format: str | None = None, encoding: str = "utf-8",
                     margin_key: str | None = None, invalid: str = "error", paired: bool | None = None) -> Preferences:
    """Read and validate every row of ``path`` (csv/tsv/json/jsonl/parquet, optionally gzip-compressed).

    ``paired``: require chosen/rejected pairs (True), unpaired labelled completions (False), or either
    (None: the first row decides, and every row must then match it). ``invalid``: ``error`` (a malformed
    row raises `DataError` naming file:line) or ``skip`` (it is skipped and counted by reason).
    """
    table = read_table(path, data_format, encoding=encoding)
    items: list[Preference] = []
    skipped: Counter = Counter()
    first_bad: list[str] = []
    for row, line in zip(table.rows, table.lines, strict=True):
        where = (path, line)
        is_pair = "label" not in row or "chosen" in row or "rejected" in row
        if paired is None:
            paired = is_pair
        if is_pair != paired:
            want = "chosen/rejected pairs" if paired else "unpaired examples with a boolean 'label'"
            raise DataError(f"expected {want} (as the task or the file's first row says); this row has the keys "
                            f"{', '.join(sorted(row))}", *where)
        try:
            items.append(_paired(row, where, margin_key) if paired else _unpaired(row, where))
        except _Skip as why:
            skipped[str(why)] += 1
        except DataError as e:
            if invalid != "skip":
                raise
            skipped["malformed"] += 1
            if len(first_bad) < 3:
                first_bad.append(f"line {line}: {str(e).split(': ', 2)[-1]}")
    if not items:
        raise DataError("no usable examples" + (f" ({Preferences([], '', True, skipped).skipped_note()})"
                                                 if skipped else ""), path)
    return Preferences(items, str(path), bool(paired), skipped, malformed=first_bad)
