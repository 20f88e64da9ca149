"""T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning ...", section 3.1.4).

Each block of ``data.max_length`` tokens (documents packed without special tokens) is corrupted: about
``task.noise_density`` (15%) of its tokens, in spans of mean length ``task.mean_noise_span_length`` (3),
are dropped from the input, each span replaced by one sentinel in order (``<extra_id_0>``,
``<extra_id_1>``, ...). The target lists every span after its sentinel and ends with one more sentinel,
as in the paper's Figure 2 ("<X> for inviting <Y> last <Z>"; T5's code ends targets with EOS only); both
input and target end with EOS. The noise mask is a numpy port of ``random_spans_noise_mask`` from
google-research/text-to-text-transfer-transformer (``t5/data/preprocessors.py``, without the optional
random roll): span lengths come from random segmentations, noise and non-noise spans interleave and the
block starts with non-noise. The number of tokens and spans is fixed by the block length, so every input
and every target of a run has the same length: batches need no padding.

Why our own code: transformers ships this collator only for Flax (``run_t5_mlm_flax.py``); a PyTorch
version was declined (huggingface/transformers#22008). Randomness comes from the global torch RNG (a
numpy generator seeded from it per block), which checkpoints restore; evaluation uses
``task.eval_seed``. A tokenizer needs n_spans + 1 sentinels: T5 tokenizers from ``tuneforge tokenizer
train --family t5`` have 100, the registry's tiny-t5 has 20 (enough for blocks up to about 380 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.streaming import Corpus, PackedBlocks, eval_batch, load_corpus_splits, scan_corpus
from tuneforge.errors import ConfigError
from tuneforge.objectives.base import Built, TaskData, TokenLogits, eval_batches
from tuneforge.objectives.configs.span_corruption import SpanCorruptionConfig

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["SpanCorruptionConfig", "SpanCorruptionObjective", "corrupt", "random_spans_noise_mask", "span_counts"]


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a ``length``-token block, rounded as T5 does."""
    num_noise = min(max(round(max(length, 2) * noise_density), 1), max(length, 2) - 1)
    return num_noise, max(round(num_noise / mean_noise_span_length), 1)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean noise mask [length] (port of T5's ``random_spans_noise_mask``)."""
    orig_length, length = length, max(length, 2)
    num_noise_tokens, num_noise_spans = span_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise_tokens = length - num_noise_tokens

    def random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        """Lengths of ``num_segments`` random non-empty segments summing to ``num_items``."""
        first_in_segment = np.arange(num_items - 1) < num_segments - 1
        rng.shuffle(first_in_segment)
        segment_id = np.cumsum(np.pad(first_in_segment, [1, 0]))
        return np.bincount(segment_id, minlength=num_segments)

    noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
    span_start_indicator = np.zeros(length, dtype=np.int64)
    span_start_indicator[np.cumsum(interleaved)[:-1]] = 1
    is_noise = np.cumsum(span_start_indicator) % 2 == 1
    return is_noise[:orig_length]


def corrupt(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of one block: spans -> sentinels in the input; sentinel + span ... + sentinel in the target."""
    starts = noise & ~np.pad(noise, [1, 0])[:-1]  # first token of each noise span
    n_spans = int(starts.sum())
    span = np.cumsum(starts) - 1
    keep = ~noise | starts
    inputs = np.where(starts, sentinels[np.maximum(span, 0)], tokens)[keep]
    targets = np.insert(tokens[noise], np.flatnonzero(starts[noise]), sentinels[:n_spans])
    return np.append(inputs, eos), np.concatenate([targets, [sentinels[n_spans], eos]])


def sentinel_ids(tokenizer: Any, needed: int, where: str) -> np.ndarray:
    """Ids of ``<extra_id_0>`` .. ``<extra_id_{needed-1}>``; a `ConfigError` when the tokenizer has fewer."""
    vocab = tokenizer.get_vocab()
    have = 0
    while f"<extra_id_{have}>" in vocab:
        have += 1
    if have < needed:
        raise ConfigError(
            f"the tokenizer of {where} has {have} sentinel tokens (<extra_id_0>, ...) but each block needs "
            f"{needed} ({needed - 1} spans + 1 final); lower data.max_length or task.noise_density, raise "
            "task.mean_noise_span_length, or use a T5 tokenizer with 100 sentinels "
            "(`tuneforge tokenizer train --family t5`)", key="data.max_length")
    return np.array([vocab[f"<extra_id_{k}>"] for k in range(needed)], dtype=np.int64)


class SpanCorruptionObjective:
    """Implements the `Objective` protocol for T5 span corruption."""

    name = "span_corruption"
    default_metric = "loss"
    greater_is_better = False

    def __init__(self, run: RunConfig):
        self.run = run

    def load_data(self, run: RunConfig) -> TaskData:
        if run.model.init != "scratch":
            import json

            from tuneforge.models.registry import resolve_model

            path = resolve_model(run.model.name)
            kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
            if kind not in ("t5", "mt5", "umt5"):
                raise ConfigError(f"task 'span_corruption' trains a T5 model; '{run.model.name}' is '{kind}' (use "
                                  "tiny-t5, or model.init=scratch model.architecture=t5)", key="model")
        return load_corpus_splits(run)

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import T5ForConditionalGeneration

        from tuneforge.models.scratch import load_or_build

        built = load_or_build(run, T5ForConditionalGeneration, model_path, architectures=("t5",))
        self.transform(built.tokenizer)  # checks the sentinels and eos before training starts
        return built

    def transform(self, tokenizer: Any) -> Callable[[np.ndarray, torch.Generator | None], dict[str, torch.Tensor]]:
        """Blocks [B, L] -> (input_ids, attention_mask, labels) with fixed lengths."""
        c, length = self.run.task, self.run.data.max_length
        _, n_spans = span_counts(length, c.noise_density, c.mean_noise_span_length)
        where = self.run.model.tokenizer if self.run.model.init == "scratch" else self.run.model.name
        sentinels = sentinel_ids(tokenizer, n_spans + 1, str(where))
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {where} has no eos token, which T5 targets end with", key="model")

        def apply(blocks: np.ndarray, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
            seeds = torch.randint(0, 2**62, (len(blocks),), generator=gen).tolist()
            pairs = []
            for block, seed in zip(blocks, seeds, strict=True):
                rng = np.random.default_rng(seed)
                noise = random_spans_noise_mask(len(block), c.noise_density, c.mean_noise_span_length, rng)
                pairs.append(corrupt(block, noise, sentinels, tokenizer.eos_token_id))
            inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
            return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs),
                    "labels": torch.from_numpy(np.stack([p[1] for p in pairs]))}

        return apply

    def prepare(self, records: Corpus, tokenizer: Any, run: RunConfig) -> PackedBlocks:
        # Packed without special tokens: EOS is appended after corruption, as T5 does.
        return PackedBlocks(records, tokenizer, run.data.max_length, transform=self.transform(tokenizer),
                            streaming=run.data.streaming, add_special_tokens=False, max_blocks=records.max_blocks)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLogits:
        """Teacher-forced decoder logits [B * T, V] and the target tokens [B * T]."""
        labels = batch["labels"]
        return TokenLogits(_logits(model, batch, labels), labels.flatten())

    def loss(self, outputs: TokenLogits, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.logits.float(), outputs.targets)

    def evaluate(self, model: nn.Module, data: PackedBlocks, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        total = correct = count = 0.0
        seed = self.run.task.eval_seed
        for _, batch in eval_batches(model, data, batch_size, runtime, lambda idx: eval_batch(data, idx, seed)):
            labels = batch.pop("labels")
            logits = _logits(model, batch, labels).float()
            total += float(F.cross_entropy(logits, labels.flatten(), reduction="sum"))
            correct += float((logits.argmax(-1) == labels.flatten()).sum())
            count += labels.numel()
        loss = total / max(count, 1)
        return {"loss": loss, "accuracy": correct / max(count, 1), "perplexity": math.exp(min(loss, 50.0)),
                "target_tokens": int(count)}

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the model and tokenizer."""

    def baseline_metrics(self, train: Any, records: Any) -> dict[str, float]:
        """None: span prediction has no model-free reference number here."""
        return {}

    def from_saved(self, model_dir: Path) -> Built:
        from transformers import AutoTokenizer, T5ForConditionalGeneration

        from tuneforge.methods.saved import load_trained

        model = load_trained(T5ForConditionalGeneration, model_dir, dtype=torch.float32)
        return Built(model.eval(), AutoTokenizer.from_pretrained(model_dir))

    def read_split(self, path: Path) -> Corpus:
        d = self.run.data
        return scan_corpus(path, fmt=d.format, text_column=d.text_column, encoding=d.encoding, key="data")

    def read_inputs(self, path: Path) -> Any:
        raise ConfigError("task 'span_corruption' has no label predictions; use `tuneforge eval RUN --data FILE` "
                          "for loss and perplexity", key="task")

    predict = read_inputs


def _logits(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Decoder logits [B * T, V], teacher-forced on ``labels`` shifted right (decoder start = pad)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    return model(**inputs, decoder_input_ids=decoder_input_ids).logits.flatten(0, 1)


OBJECTIVE = SpanCorruptionObjective
