"""Prompts, sampling and token scoring for the rollout objectives (``ppo``, ``grpo``).

Prompts come from ``data.text_column`` of any table file (csv/tsv/json/jsonl/parquet/txt); a value is a
string or, with ``task.chat``, a list of messages. ``task.prompt_words`` keeps a prompt's first N words (an
opening to continue); prompts are then tokenized (raw text, or the chat template with the generation prompt)
and cut from the left to ``task.max_prompt_length`` tokens. Batches are left-padded, so every completion
starts at the same column.

Sampling and scoring agree by construction (the pitfall behind negative KL in trl#235 / #925): completions
are sampled by ``model.generate`` with a `GenerationConfig` that sets *every* logits processor to off
(temperature only; no top-k, top-p, repetition penalty or minimum length, whatever the model's own
generation_config says), and log-probs are scored as ``log_softmax(logits / temperature)`` at the same
positions, with the position ids generation used. A completion ends at its first end-of-sequence token (kept
and scored) or after ``task.max_new_tokens``.

`score_tokens` runs one forward pass and projects only the hidden states that predict a completion token
through the LM head (as `causal_lm.lm_forward` does); the same hidden states feed the value head (PPO).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import plan_batches
from tuneforge.data.readers import column_values, read_table, resolve_column
from tuneforge.errors import DataError

__all__ = ["PromptBatches", "Prompts", "Rollout", "TokenScores", "encode_prompts", "read_prompts", "sample",
           "score_tokens"]


@dataclass
class Prompts:
    """Prompts of one file: ``texts`` (what a reward sees: the raw prompt, or the last user message),
    ``messages`` (chat form, or None for raw text), and where each came from."""

    texts: list[str]
    messages: list[list[dict[str, str]]] | None
    source: str
    lines: list[int]
    split: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Prompts:
        return Prompts([self.texts[i] for i in idx], [self.messages[i] for i in idx] if self.messages else None,
                       self.source, [self.lines[i] for i in idx], self.split)


def _opening(text: str, words: int | None) -> str:
    return " ".join(text.split()[:words]) if words else text


def read_prompts(run: RunConfig, path: Path) -> Prompts:
    """Read and validate the prompts of ``path`` (an empty prompt or a malformed message list names file:line)."""
    d, t = run.data, run.task
    table = read_table(path, d.format, header=d.header, quoting=d.quoting, delimiter=d.delimiter,
                       encoding=d.encoding, extra_fields=d.extra_fields)
    col = resolve_column(table, d.text_column, "prompt column (data.text_column)")
    values = column_values(table, col, role="prompt")
    texts, messages = [], []
    for value, line in zip(values, table.lines, strict=True):
        if isinstance(value, list):
            if not t.chat:
                raise DataError("a message list needs task.chat=true", path, line)
            ok = value and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value)
            if not ok:
                raise DataError("a prompt message list needs {role, content} objects", path, line)
            msgs = [{"role": str(m["role"]), "content": m["content"]} for m in value]
        else:
            msgs = [{"role": "user", "content": _opening(str(value), t.prompt_words)}]
        text = msgs[-1]["content"] if t.chat else _opening(str(value), t.prompt_words)
        if not text.strip():
            raise DataError(f"empty prompt in column {col!r}", path, line)
        texts.append(text)
        messages.append(msgs)
    return Prompts(texts, messages if t.chat else None, str(path), list(table.lines))


def encode_prompts(tokenizer: Any, prompts: Prompts, max_prompt_length: int, template: str | None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (cut from the left) and how many were cut."""
    if prompts.messages is not None:
        rendered = [tokenizer.apply_chat_template(m, chat_template=template, tokenize=False, add_generation_prompt=True)
                    for m in prompts.messages]
        ids = tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        ids = tokenizer(prompts.texts, verbose=False)["input_ids"]
    cut = sum(1 for x in ids if len(x) > max_prompt_length)
    return [list(x[-max_prompt_length:]) for x in ids], cut


class PromptBatches:
    """Tokenized prompts: seeded batch plans (as every `Batches`) and left-padded collation."""

    def __init__(self, ids: list[list[int]], prompts: Prompts, pad_id: int):
        self.ids, self.prompts, self.pad_id = ids, prompts, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def plan(self, epoch: int, batch_size: int, *, seed: int, shuffle: bool) -> list[list[int]]:
        return plan_batches(None, len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle, group_by_length=False)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for k, r in enumerate(rows):
            ids[k, width - len(r):] = r
            mask[k, width - len(r):] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "index": torch.as_tensor(list(indices))}


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts.

    Attributes:
        input_ids: prompt (left-padded) + completion tokens [B, P + R].
        attention_mask: 1 on real prompt tokens and every completion position [B, P + R].
        prompt_length: P, the column where completions start.
        response_mask: 1 on each completion's tokens up to and including its end of sequence [B, R].
        prompts, completions: texts (what the reward sees).
        ended: whether each completion ended with its own end-of-sequence token [B].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor
    prompts: list[str]
    completions: list[str]
    ended: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        """The position ids generation used: counting real tokens only (left padding gets 0)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def select(self, idx: torch.Tensor) -> Rollout:
        i = idx.tolist()
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.prompt_length, self.response_mask[idx],
                       [self.prompts[k] for k in i], [self.completions[k] for k in i], self.ended[idx])


def _eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def generation_config(tokenizer: Any, model: nn.Module, max_new_tokens: int, temperature: float, *,
                      greedy: bool = False) -> Any:
    """Pure sampling at ``temperature`` (every other logits processor off, see module docstring)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=not greedy, temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        min_new_tokens=0, max_new_tokens=max_new_tokens, num_beams=1, bad_words_ids=None, suppress_tokens=None,
        begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, renormalize_logits=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=_eos_ids(tokenizer, model), use_cache=True,
    )


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], texts: list[str], *,
           max_new_tokens: int, temperature: float, greedy: bool = False) -> Rollout:
    """Sample one completion per row of a left-padded prompt ``batch`` (on the model's device)."""
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    cfg = generation_config(tokenizer, model, max_new_tokens, temperature, greedy=greedy)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=cfg)
    p = prompt_ids.shape[1]
    response = out[:, p:]
    if response.shape[1] == 0:  # nothing generated at all: score one end-of-sequence token
        response = torch.full((out.shape[0], 1), cfg.eos_token_id[0], dtype=out.dtype, device=out.device)
        out = torch.cat([out, response], 1)
    is_eos = torch.isin(response, torch.as_tensor(cfg.eos_token_id, device=response.device))
    # 1 up to and including the first EOS: positions where no EOS came strictly before
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
    response_mask = (before == 0).long()
    attention = torch.cat([prompt_mask, torch.ones_like(response)], 1)
    completions = []
    for row, m in zip(response, response_mask, strict=True):
        toks = row[m.bool()].tolist()
        completions.append(tokenizer.decode(toks, skip_special_tokens=True))
    return Rollout(out, attention, p, response_mask, list(texts), completions, is_eos.any(1))


@dataclass
class TokenScores:
    """Per completion token [B, R] (0 outside the response mask): log-probs, entropies, values (or None)."""

    logps: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None = None


@contextmanager
def _response_positions(head: nn.Module, scored: torch.Tensor, keep: dict[str, torch.Tensor]):
    """While active, ``head`` sees only the hidden states predicting a completion token ([N, H]); they are
    also kept in ``keep["hidden"]`` for the value head. Virtual tokens a method prepends come first: skipped."""

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        hidden = hidden[:, hidden.shape[1] - scored.shape[1] - 1 : -1][scored]
        keep["hidden"] = hidden
        return (hidden, *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def score_tokens(model: nn.Module, rollout: Rollout, temperature: float, value_head: nn.Module | None = None,
                 *, entropy: bool = True) -> TokenScores:
    """Log-probs of the sampled tokens under ``model`` at ``temperature`` (and the value head's values)."""
    ids, p = rollout.input_ids, rollout.prompt_length
    mask = rollout.response_mask.bool()
    scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    scored[:, p - 1 :] = mask
    keep: dict[str, torch.Tensor] = {}
    with _response_positions(model.get_output_embeddings(), scored, keep):
        logits = model(input_ids=ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids,
                       use_cache=False).logits
    logits = logits.float() / temperature  # [N, V]
    log_probs = F.log_softmax(logits, -1)
    targets = ids[:, 1:][scored]
    flat = log_probs.gather(-1, targets[:, None]).squeeze(-1)

    def spread(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        return out.masked_scatter(mask, x)

    ent = spread(-(log_probs.exp() * log_probs).sum(-1).detach()) if entropy else torch.zeros(mask.shape)
    values = None
    if value_head is not None:
        values = spread(value_head(keep["hidden"].float()).squeeze(-1))
    return TokenScores(spread(flat), ent, values)
