"""Supervised fine-tuning on instructions and chats (``task: sft``), loss on the assistant's tokens only.

Rows are alpaca, sharegpt or openai-messages records (see `data.chat`, detected per file or forced with
``task.format``); ``task.system_prompt`` is added to conversations that have no system message. Each
conversation is rendered with a chat template (``task.template``: ``auto`` = the tokenizer's own, falling
back to alpaca; or ``alpaca`` / ``chatml`` / ``plain``) and only the assistant turns, every one of them, with
their end-of-turn token, are supervised (``task.train_on_prompt: true`` supervises everything). The
template used is stored as the saved tokenizer's chat template, so generation formats prompts the same way.

Examples longer than ``data.max_length`` are truncated at the end, and dropped when no response token is
left; both are counted in the run's notes. ``task.packing: documents`` packs whole examples into rows
with attention kept inside each (see `data.packing`). Evaluation: the held-out response loss (mean NLL
per response token) and its perplexity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import Batches
from tuneforge.data.chat import Conversations, encode_conversations, read_conversations, resolve_template
from tuneforge.data.packing import lm_batches, pack_documents, packed_grouping
from tuneforge.data.splits import train_validation
from tuneforge.errors import ConfigError, DataError
from tuneforge.objectives.base import Built, TaskData
from tuneforge.objectives.causal_lm import (
    CausalLMObjective,
    check_decoder,
    load_causal_lm,
    saved_causal_lm,
)
from tuneforge.objectives.configs.sft import SftConfig

__all__ = ["SftConfig", "SftObjective"]


class SftObjective(CausalLMObjective):
    """Implements the `Objective` protocol for supervised fine-tuning with response-only loss."""

    name = "sft"

    def __init__(self, run: RunConfig):
        super().__init__(run)
        self.template: str | None = None
        self._samples: Conversations | None = None

    # ----------------------------------------------------------------- data
    def _read(self, path: Path) -> Conversations:
        t, d = self.run.task, self.run.data
        return read_conversations(path, t.format, system_prompt=t.system_prompt, data_format=d.format,
                                  encoding=d.encoding)

    def load_data(self, run: RunConfig) -> TaskData:
        d = run.data
        if d.train is None:
            raise ConfigError("a training file is required (e.g. data.train=alpaca.json)", key="data.train")
        check_decoder(run)
        train = self._read(d.train)
        train, val, notes = train_validation(train, lambda: self._read(d.validation), d, run.train.seed)
        self.notes.extend(notes)
        splits: dict[str, Any] = {"train": train, "validation": val}
        if d.test is not None:
            splits["test"] = self._read(d.test)
        for name, convs in splits.items():
            convs.split = name
        self._samples = val
        info = {"format": train.format, "examples": {k: len(v) for k, v in splits.items()}}
        return TaskData(splits=splits, info=info, notes=self.notes)

    # ----------------------------------------------------------------- model
    def _use_template(self, tokenizer: Any) -> None:
        template, what = resolve_template(tokenizer, self.run.task.template)
        if tokenizer.chat_template != template:
            tokenizer.chat_template = template  # saved with the model: generation renders prompts the same way
        self.template = template
        note = f"chat template: {what}"
        if note not in self.notes:
            self.notes.append(note)

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        built = load_causal_lm(run, model_path, packed=run.task.packing == "documents")
        self._use_template(built.tokenizer)
        return built

    def prepare(self, records: Conversations, tokenizer: Any, run: RunConfig) -> Batches:
        if self.template is None:
            self._use_template(tokenizer)
        size = run.data.max_length
        cols, stats = encode_conversations(tokenizer, self.template, records, max_length=size,
                                           train_on_prompt=run.task.train_on_prompt)
        note = f"{records.split or records.source}: {stats['examples']} examples"
        if stats["truncated"]:
            note += (f", {stats['truncated']} longer than data.max_length={size} truncated, of which "
                     f"{stats['dropped']} dropped (no response token left)")
        if run.task.packing == "documents" and cols["input_ids"]:
            cols = pack_documents(cols["input_ids"], cols["labels"], size)
            note += f", packed into {len(cols['input_ids'])} rows"
        if note not in self.notes:
            self.notes.append(note)
        if not cols["input_ids"]:
            raise DataError(f"every example is longer than data.max_length={size} before its response; raise it",
                            records.source)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return lm_batches(cols, pad, group_by_length=packed_grouping(run.train.group_by_length, run.task.packing))

    # ----------------------------------------------------------------- training
    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the HF folder, whose tokenizer carries the chat template used in training."""

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        built = saved_causal_lm(model_dir)
        self._use_template(built.tokenizer)
        return built

    def read_split(self, path: Path) -> Conversations:
        return self._read(path)

    def report_samples(self, model: nn.Module, tokenizer: Any) -> list[dict[str, Any]]:
        """Greedy replies to the last user turn of three held-out conversations, with the reference reply."""
        from tuneforge.generation import GenerationOptions, generate

        if self._samples is None:
            return []
        fits = lambda msgs: len(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)) \
            <= 2 * self.run.data.max_length  # noqa: E731  (characters: a cheap bound keeping prompts short)
        convs = [c.messages for c in self._samples.items[:20] if fits(c.messages[:-1])][:3]
        prompts = [m[:-1] for m in convs]
        replies = generate(model, tokenizer, prompts, GenerationOptions(max_new_tokens=96), chat=True)
        return [{"prompt": m[-2]["content"], "reference": m[-1]["content"], "generation": g}
                for m, g in zip(convs, replies, strict=True)]


OBJECTIVE = SftObjective
