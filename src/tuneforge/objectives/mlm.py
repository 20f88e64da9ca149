"""Masked language modelling (BERT, Devlin et al. 2019; dynamic masking as in RoBERTa, Liu et al. 2019).

Text is packed into full blocks of ``data.max_length`` tokens (`tuneforge.data.streaming`). Masks are
drawn anew for every batch when it is collated (RoBERTa's dynamic masking), from the global torch RNG
that checkpoints save and restore, so a resumed run masks exactly as an uninterrupted one. Of the
tokens, ``task.mlm_probability`` (15%) are selected; special tokens are never selected (blocks have no
padding); a selected token becomes ``[MASK]`` with ``task.mask_replace_prob`` (80%), a random token with
``task.random_replace_prob`` (10%), and stays as is otherwise (10%). The loss is cross-entropy on the
selected tokens only. Evaluation masks each block with its own generator seeded from (``task.eval_seed``,
block index), so numbers are comparable across evaluations, runs and evaluation batch sizes, and the
training RNG is left alone: loss, accuracy on the selected tokens, perplexity = exp(loss).

Token-level masking is transformers' ``DataCollatorForLanguageModeling.torch_mask_tokens``. Whole-word
masking (``task.whole_word_mask``; Devlin et al.'s 2019 release) is our own: transformers v5 finds words
from character offsets and then drops the 80/10/10 split (``mask_replace_prob`` forced to 1); we find
word starts from the vocabulary (WordPiece ``##`` continuations; ``Ġ``/``▁`` word-start markers of
byte-level BPE and SentencePiece-style vocabularies), which works on packed blocks without offsets,
select whole words with ``mlm_probability`` (so each token is still selected with that probability) and
keep the per-token 80/10/10 of the original release.

The model is ``AutoModelForMaskedLM`` (or a scratch bert/roberta). A checkpoint without an MLM head
(all-MiniLM-L6-v2) gets a fresh head, which the pipeline lists as newly initialized.
"""

from __future__ import annotations

import json
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
from tuneforge.objectives.configs.mlm import MLMConfig

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["MLMConfig", "MLMObjective", "WholeWordMasker", "word_start_table"]


def word_start_table(tokenizer: Any) -> np.ndarray:
    """Boolean per token id: does this token start a word? (WordPiece '##', or 'Ġ'/'▁' markers)."""
    vocab = tokenizer.get_vocab()
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    table = np.ones(len(tokenizer), dtype=bool)
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        for tok, i in vocab.items():
            table[i] = not tok.startswith(prefix)
        return table
    for marker in ("Ġ", "▁"):
        if any(tok.startswith(marker) for tok in vocab):
            for tok, i in vocab.items():
                table[i] = tok.startswith(marker) or tok in tokenizer.all_special_tokens
            return table
    raise ConfigError("cannot tell word starts for this tokenizer (no WordPiece '##' and no 'Ġ'/'▁' markers)",
                      key="task.whole_word_mask")


class WholeWordMasker:
    """Whole-word selection with per-token 80/10/10 replacement (see the module docstring for why)."""

    def __init__(self, tokenizer: Any, cfg: MLMConfig):
        self.starts = torch.from_numpy(word_start_table(tokenizer))
        self.cfg, self.mask_id, self.vocab = cfg, tokenizer.mask_token_id, len(tokenizer)

    def __call__(self, ids: torch.Tensor, special: torch.Tensor, gen: torch.Generator | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        start = self.starts[ids] & ~special
        after_special = torch.zeros_like(special)
        after_special[:, 1:] = special[:, :-1]
        start |= ~special & (after_special | (torch.arange(ids.shape[1]) == 0))  # a block may start mid-word
        word = torch.cumsum(start, dim=1)  # [B, T] word number; continuation tokens share their start's
        chosen = start & (torch.rand(ids.shape, generator=gen) < c.mlm_probability)
        table = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        table.scatter_reduce_(1, word, chosen.long(), reduce="amax")
        selected = table.gather(1, word).bool() & ~special
        u = torch.rand(ids.shape, generator=gen)
        to_mask = selected & (u < c.mask_replace_prob)
        to_random = selected & ~to_mask & (u < c.mask_replace_prob + c.random_replace_prob)
        random_ids = torch.randint(self.vocab, ids.shape, generator=gen)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        inputs = torch.where(to_mask, torch.full_like(ids, self.mask_id), torch.where(to_random, random_ids, ids))
        return inputs, labels


class MLMObjective:
    """Implements the `Objective` protocol for masked language modelling."""

    name = "mlm"
    default_metric = "loss"
    greater_is_better = False

    def __init__(self, run: RunConfig):
        self.run = run
        self._maskers: dict[int, Callable] = {}

    # ----------------------------------------------------------------- data and model
    def load_data(self, run: RunConfig) -> TaskData:
        if run.model.init != "scratch":
            from tuneforge.models.registry import model_family, resolve_model

            family = model_family(resolve_model(run.model.name))
            if family != "encoder":
                raise ConfigError(f"task 'mlm' trains an encoder; '{run.model.name}' is a {family} model (use e.g. "
                                  "minilm-l6 or tiny-bert, or model.init=scratch model.architecture=bert)", key="model")
        return load_corpus_splits(run)

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModelForMaskedLM

        from tuneforge.models.scratch import load_or_build

        built = load_or_build(run, AutoModelForMaskedLM, model_path, architectures=("bert", "roberta"))
        _check_mask_token(built.tokenizer, run)
        _check_positions(built.model.config, run.data.max_length)
        return built

    def _masker(self, tokenizer: Any) -> Callable:
        """(ids [B, T], special [B, T], generator) -> (inputs, labels), cached per tokenizer."""
        key = id(tokenizer)
        if key not in self._maskers:
            c = self.run.task
            if c.whole_word_mask:
                self._maskers[key] = WholeWordMasker(tokenizer, c)
            else:
                from transformers import DataCollatorForLanguageModeling

                collator = DataCollatorForLanguageModeling(
                    tokenizer, mlm_probability=c.mlm_probability, mask_replace_prob=c.mask_replace_prob,
                    random_replace_prob=c.random_replace_prob)

                def mask(ids: torch.Tensor, special: torch.Tensor, gen: torch.Generator | None):
                    collator.generator = gen  # None: the global RNG (saved in checkpoints)
                    return collator.torch_mask_tokens(ids, special_tokens_mask=special)

                self._maskers[key] = mask
        return self._maskers[key]

    def transform(self, tokenizer: Any) -> Callable[[np.ndarray, torch.Generator | None], dict[str, torch.Tensor]]:
        """Blocks [B, T] -> a masked batch (input_ids, attention_mask, labels)."""
        _check_mask_token(tokenizer, self.run)
        special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        masker = self._masker(tokenizer)

        def apply(blocks: np.ndarray, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(blocks)
            special = torch.isin(ids, special_ids)
            inputs, labels = masker(ids.clone(), special, gen)
            return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}

        return apply

    def prepare(self, records: Corpus, tokenizer: Any, run: RunConfig) -> PackedBlocks:
        return PackedBlocks(records, tokenizer, run.data.max_length, transform=self.transform(tokenizer),
                            streaming=run.data.streaming, add_special_tokens=True, max_blocks=records.max_blocks)

    # ----------------------------------------------------------------- training and evaluation
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLogits:
        """Logits at the selected (masked) positions and the original tokens there."""
        return TokenLogits(*masked_logits(model, batch))

    def loss(self, outputs: TokenLogits, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if outputs.targets.numel() == 0:  # nothing selected in this batch (tiny batches): a zero that keeps the graph
            return outputs.logits.sum() * 0.0
        return F.cross_entropy(outputs.logits.float(), outputs.targets)

    def evaluate(self, model: nn.Module, data: PackedBlocks, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        total = correct = count = 0.0
        seed = self.run.task.eval_seed
        for _, batch in eval_batches(model, data, batch_size, runtime, lambda idx: eval_batch(data, idx, seed)):
            logits, labels = masked_logits(model, batch)
            logits = logits.float()
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(-1) == labels).sum())
            count += labels.numel()
        loss = total / max(count, 1)
        return {"loss": loss, "accuracy": correct / max(count, 1), "perplexity": math.exp(min(loss, 50.0)),
                "masked_tokens": int(count)}

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the model and tokenizer."""

    def baseline_metrics(self, train: Any, records: Any) -> dict[str, float]:
        """None: masked-token prediction has no model-free reference number here."""
        return {}

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from tuneforge.methods.saved import load_trained

        model = load_trained(AutoModelForMaskedLM, model_dir, dtype=torch.float32)
        return Built(model.eval(), AutoTokenizer.from_pretrained(model_dir))

    def read_split(self, path: Path) -> Corpus:
        d = self.run.data
        return scan_corpus(path, fmt=d.format, text_column=d.text_column, encoding=d.encoding, key="data")

    def read_inputs(self, path: Path) -> Any:
        raise ConfigError("task 'mlm' has no label predictions; use `tuneforge eval RUN --data FILE` for "
                          "loss and perplexity, or transformers' fill-mask pipeline on RUN/model", key="task")

    predict = read_inputs


def masked_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], labels [N]) at the N selected positions.

    For a plain ``*ForMaskedLM`` model the vocabulary projection runs on the selected positions only
    (about 15% of tokens): for a small encoder it is a large share of the FLOPs (MiniLM: 384 x 30,522 per
    token against about 10M for the six blocks). Other models (e.g. wrapped by a PEFT method) run whole.
    """
    labels = batch["labels"]
    sel = labels != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = _mlm_head(model)
    if head is not None:
        hidden = model.base_model(**inputs).last_hidden_state
        return head(hidden[sel]), labels[sel]
    return model(**inputs).logits[sel], labels[sel]


def _mlm_head(model: nn.Module) -> nn.Module | None:
    if not type(model).__name__.endswith("ForMaskedLM"):
        return None
    for name in ("cls", "lm_head"):  # BERT-like, RoBERTa-like
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and model.base_model is not model:
            return head
    return None


def _check_mask_token(tokenizer: Any, run: RunConfig) -> None:
    if tokenizer.mask_token_id is None:
        where = run.model.tokenizer if run.model.init == "scratch" else run.model.name
        raise ConfigError(f"the tokenizer of {where} has no mask token, which MLM needs (train one with "
                          "`tuneforge tokenizer train --family bert|roberta`)", key="model")


def _check_positions(config: Any, length: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and "roberta" in str(getattr(config, "model_type", "")):
        limit -= (config.pad_token_id or 0) + 1  # RoBERTa positions start after the padding index
    if limit is not None and length > limit:
        raise ConfigError(f"{length} is longer than the model's {limit} positions", key="data.max_length")


OBJECTIVE = MLMObjective
