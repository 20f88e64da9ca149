"""Tokenizing preference data and batching chosen with rejected in one forward pass.

Two encodings of a `data.preference.Preference`:

* `encode_responses` (DPO family): prompt + response rendered with the chat template, tokenized once as at
  inference, and only the response's tokens labelled (as `data.chat` does for SFT: by where each token's
  characters start). The prompt is cut from the left to ``max_prompt_length`` tokens (its end, next to
  the response, is what matters), then the response from the right so the whole fits ``max_length``;
  both cuts are counted. A response left with no token is dropped and counted.
* `encode_texts` (reward models): the rendered conversation as one text (special tokens added by the
  tokenizer), cut from the left so the response, which the score is about, is kept.

`PairBatches` keeps each example's chosen and rejected sequences together: a batch of B pairs is one
[2B, T] tensor, the B chosen rows first, so the model runs once per step (TRL's ``concatenated_forward``).
Unpaired data (KTO) uses the same class with one sequence per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tuneforge.data.batching import plan_batches
from tuneforge.data.preference import Preferences
from tuneforge.errors import ConfigError
from tuneforge.eval.lm import IGNORE_INDEX

__all__ = ["PLAIN_TEMPLATE", "PairBatches", "encode_responses", "encode_texts", "render_prompt", "resolve_text_template"]

#: rendering of conversations for models without a chat template (encoders): no special tokens (the
#: tokenizer adds its own [CLS]/[SEP] or BOS), one "Role: text" paragraph per message.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
                  "{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '\n\nAssistant: ' }}{% endif %}")


def resolve_text_template(tokenizer: Any) -> tuple[str, str]:
    """(template, what it is) for reward texts: the tokenizer's own chat template, else `PLAIN_TEMPLATE`."""
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if isinstance(own, str) and own:
        return own, "the tokenizer's chat template"
    return PLAIN_TEMPLATE, "plain 'Role: text' paragraphs (the tokenizer has no chat template)"


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def render_prompt(tokenizer: Any, template: str, prompt: list[dict[str, str]]) -> str:
    """The prompt as the model sees it before answering (with the generation prompt)."""
    return _render(tokenizer, template, prompt, True)


def _stats() -> dict[str, int]:
    return {"examples": 0, "prompt_truncated": 0, "response_truncated": 0, "dropped": 0}


def encode_responses(tokenizer: Any, template: str, prefs: Preferences, *, max_length: int,
                     max_prompt_length: int) -> tuple[dict[str, list], dict[str, int]]:
    """Columns ``input_ids``/``labels`` per response (``chosen_*`` and ``rejected_*`` for pairs) and ``keep``
    (row indices of ``prefs`` that survived), with counts ``{examples, prompt_truncated, response_truncated,
    dropped}``. Labels are ``-100`` except on response tokens."""
    sides = ("chosen", "rejected") if prefs.paired else ("chosen",)
    prompts = [render_prompt(tokenizer, template, p.prompt) for p in prefs.items]
    cols: dict[str, list] = {f"{s}_{k}": [] for s in sides for k in ("input_ids", "labels")}
    cols["keep"] = []
    stats = _stats()
    stats["examples"] = len(prefs)
    encoded = {}
    for side in sides:
        texts, spans = [], []
        for pref, prompt in zip(prefs.items, prompts, strict=True):
            response = pref.chosen if side == "chosen" else pref.rejected
            full = _render(tokenizer, template, [*pref.prompt, {"role": "assistant", "content": response}], False)
            if not full.startswith(prompt):
                raise ConfigError("the chat template renders the prompt differently once a reply follows, so the "
                                  "reply's tokens cannot be located; set task.template to alpaca, chatml or plain",
                                  key="task.template")
            texts.append(full)
            spans.append((len(prompt), len(full.rstrip())))
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False,
                        return_attention_mask=False)
        encoded[side] = (enc["input_ids"], enc["offset_mapping"], spans)
    for i in range(len(prefs)):
        rows, prompt_cut, response_cut = [], False, False
        for side in sides:
            ids_list, offsets_list, spans = encoded[side]
            ids = np.asarray(ids_list[i], dtype=np.int64)
            starts = np.asarray([o[0] for o in offsets_list[i]], dtype=np.int64)
            start, end = spans[i]
            n_prompt = int((starts < start).sum())  # tokens are in order: the prompt's come first
            labelled = (starts >= start) & (starts < end)
            labels = np.where(labelled, ids, IGNORE_INDEX)
            if n_prompt > max_prompt_length:
                cut = n_prompt - max_prompt_length
                ids, labels, n_prompt, prompt_cut = ids[cut:], labels[cut:], max_prompt_length, True
            if len(ids) > max_length:
                ids, labels, response_cut = ids[:max_length], labels[:max_length], True
            rows.append((ids, labels))
        stats["prompt_truncated"] += prompt_cut
        stats["response_truncated"] += response_cut
        if any(not (labels[1:] != IGNORE_INDEX).any() for _, labels in rows):
            stats["dropped"] += 1
            continue
        cols["keep"].append(i)
        for side, (ids, labels) in zip(sides, rows, strict=True):
            cols[f"{side}_input_ids"].append(ids.tolist())
            cols[f"{side}_labels"].append(labels.tolist())
    return cols, stats


def encode_texts(tokenizer: Any, template: str, prefs: Preferences, *,
                 max_length: int) -> tuple[dict[str, list], dict[str, int]]:
    """``chosen_input_ids`` and ``rejected_input_ids`` of whole rendered conversations (special tokens added,
    cut from the left to ``max_length``); counts ``{examples, truncated}``."""
    cols: dict[str, list] = {}
    stats = {"examples": len(prefs), "truncated": 0}
    side_before = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        for side in ("chosen", "rejected"):
            texts = [_render(tokenizer, template, [*p.prompt, {"role": "assistant", "content": getattr(p, side)}],
                             False) for p in prefs.items]
            full = tokenizer(texts, verbose=False, return_attention_mask=False)["input_ids"]
            cut = tokenizer(texts, truncation=True, max_length=max_length, verbose=False,
                            return_attention_mask=False)["input_ids"]
            stats["truncated"] += sum(len(a) != len(b) for a, b in zip(full, cut, strict=True))
            cols[f"{side}_input_ids"] = cut
    finally:
        tokenizer.truncation_side = side_before
    return cols, stats


class PairBatches:
    """Examples of one or two sequences (``sides``) batched as one [n_sides * B, T] tensor per column, side by
    side (all chosen rows, then all rejected rows), right-padded to the batch's longest sequence.

    Args:
        columns: ``{side}_input_ids`` (and ``{side}_labels`` for LM objectives) per side, per example.
        pad_id: token id padding ``input_ids`` (labels pad with -100, the attention mask with 0).
        extra: per-example tensors put in every batch as they are (e.g. ``margin`` [N], ``ref_logps``
            [N, n_sides]: precomputed reference log-probs).
        group_by_length: group training batches by the longer side's length.
    """

    def __init__(self, columns: dict[str, list], sides: Sequence[str], pad_id: int, *,
                 extra: dict[str, torch.Tensor] | None = None, group_by_length: bool = True):
        self.columns, self.sides, self.pad_id = columns, tuple(sides), pad_id
        self.extra = dict(extra or {})
        self.group_by_length = group_by_length
        lens = [np.fromiter((len(x) for x in columns[f"{s}_input_ids"]), dtype=np.int64) for s in self.sides]
        self.side_lengths = np.stack(lens)  # [n_sides, N]
        self.lengths = self.side_lengths.max(0)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.side_lengths.sum())

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]:
        return plan_batches(self.lengths, len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                            group_by_length=self.group_by_length)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = list(indices)
        width = int(self.lengths[idx].max())
        n = len(idx) * len(self.sides)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        has_labels = f"{self.sides[0]}_labels" in self.columns
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64) if has_labels else None
        row = 0
        for side in self.sides:
            col_ids = self.columns[f"{side}_input_ids"]
            col_labels = self.columns.get(f"{side}_labels")
            for i in idx:
                seq = col_ids[i]
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
                if labels is not None:
                    labels[row, : len(seq)] = col_labels[i]
                row += 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if labels is not None:
            batch["labels"] = torch.from_numpy(labels)
        t = torch.as_tensor(idx, dtype=torch.long)
        batch.update({k: v.index_select(0, t) for k, v in self.extra.items()})
        return batch
