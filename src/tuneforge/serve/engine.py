"""The forward passes the server runs, on the worker thread: batched generation, streaming, embeddings.

Generation reuses `tuneforge.generation`'s prompt rendering, stop handling and generation config, so
greedy output is the same as ``tuneforge generate`` on the same run (tested), and adds what an API
answer needs: prompt and completion token counts and a finish reason (``stop``: end of sequence or a
stop string; ``length``: ``max_tokens`` reached).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.generation import (
    GenerationOptions,
    _config,
    _cut,
    _drops_position_ids,
    _encode,
    _on,
    _render,
    _stops,
)
from tuneforge.serve.errors import APIError

__all__ = ["Row", "check_prompt", "embed", "generate_rows", "render", "stream_row"]


@dataclass
class Row:
    """One generated sequence."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def render(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool, system_prompt: str | None) -> str:
    """The prompt text the model reads: a chat rendered by the model's template, or raw text."""
    if chat and tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template (its tokenizer has none): use /v1/completions for raw "
                            "text, or serve a task=sft run, which stores the template it was trained with",
                       param="messages", code="no_chat_template")
    try:
        return _render(tokenizer, [prompt], chat, system_prompt)[0]
    except Exception as e:  # a template that raises on these messages (e.g. roles it does not allow)
        raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages",
                       code="template_error") from None


def check_prompt(tokenizer: Any, model: Any, text: str, chat: bool, max_new: int, max_prompt: int) -> int:
    """Token count of ``text``; 400 when it passes the server cap or prompt + ``max_new`` the model's context."""
    n = len(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    if n > max_prompt:
        raise APIError(400, f"the prompt has {n} tokens; this server accepts at most {max_prompt}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and n + max_new > limit:
        raise APIError(400, f"the prompt ({n} tokens) plus max_tokens ({max_new}) exceeds the model's context of "
                            f"{limit} tokens", param="max_tokens", code="context_length_exceeded")
    return n


def _eos_ids(cfg: Any) -> set[int]:
    eos = cfg.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _row(tokenizer: Any, ids: list[int], eos: set[int], stops: Sequence[str], max_new: int, n_prompt: int) -> Row:
    count = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
    text, stopped = _cut(tokenizer.decode(ids, skip_special_tokens=True), stops)
    if count is not None or stopped:
        return Row(text, "stop", n_prompt, count if count is not None else len(ids))
    return Row(text, "length" if len(ids) >= max_new else "stop", n_prompt, len(ids))


@torch.inference_mode()
def generate_rows(model: Any, tokenizer: Any, texts: list[str], options: GenerationOptions, *, chat: bool,
                  prompt_tokens: list[int], limits: list[int] | None = None) -> list[Row]:
    """Generate for every rendered prompt in ``texts`` in one batch (one by one for soft-prompt models).

    ``limits``: each row's own ``max_tokens`` when requests with different limits share the batch (the
    batch runs to the largest; a row's first k greedy tokens do not depend on how far it runs, so cutting
    it at its own limit gives what generating it alone would).
    """
    from transformers import set_seed

    stops = _stops(tokenizer, options, chat)
    cfg = _config(model, tokenizer, options, stops)
    eos = _eos_ids(cfg)
    if options.seed is not None:
        set_seed(options.seed)
    limits = limits or [options.max_new_tokens] * len(texts)
    step = 1 if _drops_position_ids(model) else len(texts)
    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Position ids are not supported", category=UserWarning)
        for start in range(0, len(texts), step):
            enc = _on(model, _encode(tokenizer, texts[start:start + step], chat))
            seqs = model.generate(**enc, generation_config=cfg, tokenizer=tokenizer if stops else None)
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            rows += [_row(tokenizer, ids[:cap], eos, stops, cap, n) for ids, n, cap in
                     zip(new, prompt_tokens[start:start + step], limits[start:start + step], strict=True)]
    return rows


class _Cancel:
    """A stopping criterion that ends generation when the client has gone away."""

    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def stream_row(model: Any, tokenizer: Any, text: str, options: GenerationOptions, *, chat: bool, prompt_tokens: int,
               push: Callable[[str], None], cancelled: threading.Event) -> Row:
    """Generate for one prompt, passing decoded text to ``push`` as it is produced; returns the whole row
    (its text has stop strings cut; the caller holds back text that may start one)."""
    from transformers import StoppingCriteriaList, TextStreamer, set_seed

    class _Push(TextStreamer):
        def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
            if piece:
                push(piece)

    stops = _stops(tokenizer, options, chat)
    cfg = _config(model, tokenizer, options, stops)
    if options.seed is not None:
        set_seed(options.seed)
    enc = _on(model, _encode(tokenizer, [text], chat))
    streamer = _Push(tokenizer, skip_prompt=True, skip_special_tokens=True)
    seqs = model.generate(**enc, generation_config=cfg, tokenizer=tokenizer if stops else None, streamer=streamer,
                          stopping_criteria=StoppingCriteriaList([_Cancel(cancelled)]))
    ids = seqs[0, enc["input_ids"].shape[1]:].tolist()
    return _row(tokenizer, ids, _eos_ids(cfg), stops, options.max_new_tokens, prompt_tokens)


@torch.inference_mode()
def embed(model: Any, tokenizer: Any, texts: list[str], max_tokens: int) -> tuple[list[torch.Tensor], list[int]]:
    """Mean of the last hidden states over each text's tokens (right-padded, mask-weighted), and token counts."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise APIError(400, "embeddings of encoder-decoder models are not served", param="model",
                       code="unsupported_model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    counts = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    if max(counts) > max_tokens:
        i = max(range(len(counts)), key=counts.__getitem__)
        raise APIError(400, f"input {i} has {counts[i]} tokens; this server accepts at most {max_tokens}",
                       param="input", code="context_length_exceeded")
    enc = _on(model, tokenizer(texts, padding=True, padding_side="right", return_tensors="pt"))
    out = model(**enc, output_hidden_states=True)
    hidden = out.hidden_states[-1].float()  # (batch, tokens, hidden)
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    means = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return list(means.cpu()), counts
