"""Sequence-to-sequence fine-tuning (``task: seq2seq``): translation, summarisation, any text -> text.

Models: any local encoder-decoder folder (T5, BART, Marian, mT5 ...) through ``AutoModelForSeq2SeqLM``;
a T5 from scratch (``model.init=scratch model.architecture=t5``, around a trained tokenizer, or continued
from a span-corruption run's folder); or an encoder-decoder warm-started from a BERT-style encoder
(``model.architecture=bert2bert``, see `models.warm_start`).

Training is teacher-forced: the decoder reads the target shifted right behind the decoder start token
and the loss is the mean cross-entropy over the real target tokens (labels -100 on padding, see
`data.seq2seq`). The output layer runs only on the hidden states of real target positions, which is the
same loss for less work (the vocabulary projection dominates a small model's cost).

Evaluation always reports the token-weighted ``loss`` and ``perplexity``. Generated-text metrics
(``bleu`` with its sacrebleu signature, ``rouge1``/``rouge2``/``rougeL``/``rougeLsum``, see `eval.seq2seq`)
come from beam search with the run's generation options (``task.num_beams``, ``task.max_new_tokens``,
``task.length_penalty``): at the final evaluation and in ``tuneforge eval`` by default, at every evaluation
with ``task.generate_eval=true``. Sources are generated in length-sorted batches (no padding waste).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.seq2seq import (
    IGNORE_INDEX,
    Seq2SeqBatches,
    Seq2SeqRecords,
    decoder_ids,
    encode_pairs,
    read_pairs,
)
from tuneforge.data.splits import train_validation
from tuneforge.errors import ConfigError
from tuneforge.objectives.base import Built, TaskData, TokenLogits, eval_batches
from tuneforge.objectives.configs.seq2seq import Seq2SeqConfig

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["Seq2SeqConfig", "Seq2SeqObjective", "generate_targets", "seq2seq_forward"]


def _shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """Decoder inputs: the decoder start token, then the labels without their last token (-100 -> pad)."""
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


@contextmanager
def _scored_rows_only(head: nn.Module, scored: torch.Tensor):
    """While active, the output layer ``head`` projects only the hidden states at ``scored`` [B, T]
    positions, giving [N, V] logits in the order of ``labels[scored]``."""

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[scored], *args[1:]) if hidden.dim() == 3 and hidden.shape[:2] == scored.shape else args

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def _ids(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    start, pad = getattr(cfg, "decoder_start_token_id", None), getattr(cfg, "pad_token_id", None)
    if start is None or pad is None:
        raise ConfigError(f"{type(model).__name__} has no decoder_start_token_id/pad_token_id in its config",
                          key="model")
    return int(start), int(pad)


def seq2seq_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLogits:
    """Teacher-forced logits [N, V] at the N real target positions and those target tokens."""
    labels = batch["labels"]
    start, pad = _ids(model)
    decoder_input_ids = _shift_right(labels, start, pad)
    scored = labels != IGNORE_INDEX
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "decoder_input_ids": decoder_input_ids, "use_cache": False}
    if head is not None:
        with _scored_rows_only(head, scored):
            logits = model(**inputs).logits
        if logits.dim() == 2:
            return TokenLogits(logits, labels[scored])
    else:
        logits = model(**inputs).logits
    return TokenLogits(logits[scored], labels[scored])


def _generation_config(model: nn.Module, tokenizer: Any, cfg: Seq2SeqConfig) -> Any:
    import copy

    gen = copy.deepcopy(model.generation_config)
    gen.update(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, length_penalty=cfg.length_penalty,
               no_repeat_ngram_size=cfg.no_repeat_ngram_size, do_sample=False,
               early_stopping=cfg.num_beams > 1)
    start, pad = _ids(model)
    gen.decoder_start_token_id, gen.pad_token_id = start, pad
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return gen


@torch.inference_mode()
def generate_targets(model: nn.Module, tokenizer: Any, sources: list[str], cfg: Seq2SeqConfig, *, max_source: int,
                     batch_size: int, runtime: Runtime, progress: bool = False) -> list[str]:
    """Generated target text of every source (``cfg.source_prefix`` added), in input order."""
    from tqdm.auto import tqdm

    gen = _generation_config(model, tokenizer, cfg)
    texts = [cfg.source_prefix + s for s in sources]
    lengths = np.array([len(t) for t in texts])
    order = np.argsort(-lengths, kind="stable")  # longest first: the memory peak shows at once
    out: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    device = runtime.device
    try:
        with runtime.autocast():
            starts = range(0, len(texts), batch_size)
            for at in tqdm(starts, desc="generate", unit="batch", disable=not progress, leave=False):
                idx = order[at : at + batch_size]
                enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_source, padding=True,
                                return_tensors="pt")
                seqs = model.generate(input_ids=enc["input_ids"].to(device),
                                      attention_mask=enc["attention_mask"].to(device), generation_config=gen)
                for i, row in zip(idx, seqs, strict=True):
                    out[int(i)] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out


class Seq2SeqObjective:
    """Implements the `Objective` protocol for encoder-decoder fine-tuning (see module docstring)."""

    name = "seq2seq"
    default_metric = "loss"
    greater_is_better = False

    def __init__(self, run: RunConfig):
        self.run = run
        self.cfg: Seq2SeqConfig = run.task
        self.notes: list[str] = []
        self.tokenizer: Any = None
        self._start: int | None = None

    # ----------------------------------------------------------------- data
    def _read(self, spec: Any) -> Seq2SeqRecords:
        d, t = self.run.data, self.cfg
        table = {"header": d.header, "quoting": d.quoting, "delimiter": d.delimiter, "extra_fields": d.extra_fields}
        return read_pairs(spec, source_column=t.source_column, target_column=t.target_column, fmt=d.format,
                          encoding=d.encoding, **table)

    def _check_model(self, run: RunConfig) -> None:
        from tuneforge.models.registry import model_family, resolve_model

        if run.model.init == "scratch" or run.model.architecture:
            return  # scratch architectures are checked by `load_or_build`, bert2bert by the warm start
        family = model_family(resolve_model(run.model.name))
        if family != "encoder-decoder":
            raise ConfigError(f"task 'seq2seq' trains an encoder-decoder; '{run.model.name}' is an {family} model "
                              "(use tiny-t5 or a T5/BART/Marian folder, model.init=scratch model.architecture=t5, or "
                              "model.architecture=bert2bert to warm-start one from an encoder)", key="model")

    def load_data(self, run: RunConfig) -> TaskData:
        d = run.data
        if d.train is None:
            raise ConfigError("a training file is required (e.g. data.train=train.jsonl with source/target columns, "
                              "or data.train: {source: train.de, target: train.en})", key="data.train")
        self._check_model(run)
        train = self._read(d.train)
        train, val, notes = train_validation(train, lambda: self._read(d.validation), d, run.train.seed,
                                             source=train.origin)
        self.notes.extend(notes)
        splits: dict[str, Any] = {"train": train, "validation": val}
        if d.test is not None:
            splits["test"] = self._read(d.test)
        for name, records in splits.items():
            records.split = name
        info = {"examples": {k: len(v) for k, v in splits.items()},
                "references": {k: v.references for k, v in splits.items()}}
        return TaskData(splits=splits, info=info, notes=self.notes)

    # ----------------------------------------------------------------- model
    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModelForSeq2SeqLM

        from tuneforge.models.scratch import load_or_build

        built = load_or_build(run, AutoModelForSeq2SeqLM, model_path, architectures=("t5",))
        if not getattr(built.model.config, "is_encoder_decoder", False):
            raise ConfigError(f"task 'seq2seq' needs an encoder-decoder; {run.model.name} loaded as "
                              f"{type(built.model).__name__}", key="model")
        if run.model.architecture == "bert2bert":
            # the warm start's cross-attention is new: say so, and let methods train it as part of the head
            built.newly_initialized = sorted(n for n, _ in built.model.named_parameters() if ".crossattention." in n)
        self._use(built.tokenizer, built.model)
        return built

    def _use(self, tokenizer: Any, model: nn.Module) -> None:
        self.tokenizer = tokenizer
        self._start, _ = decoder_ids(tokenizer, model.config)

    def prepare(self, records: Seq2SeqRecords, tokenizer: Any, run: RunConfig) -> Seq2SeqBatches:
        if self._start is None:
            raise RuntimeError("build() or from_saved() must run before prepare()")
        training = records.split == "train"
        cols, stats = encode_pairs(tokenizer, records, prefix=self.cfg.source_prefix, max_source=run.data.max_length,
                                   max_target=self.cfg.max_target_length, decoder_start=self._start,
                                   every_reference=training)
        note = f"{records.split or records.origin}: {stats['examples']} examples"
        if training and stats["examples"] > len(records):
            note += f" ({len(records)} sources, one example per reference)"
        if stats["sources_truncated"]:
            note += f", {stats['sources_truncated']} sources cut at data.max_length={run.data.max_length}"
        if stats["targets_truncated"]:
            note += f", {stats['targets_truncated']} targets cut at task.max_target_length={self.cfg.max_target_length}"
        if note not in self.notes:
            self.notes.append(note)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return Seq2SeqBatches(cols, pad, group_by_length=run.train.group_by_length, records=records)

    # ----------------------------------------------------------------- training
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLogits:
        return seq2seq_forward(model, batch)

    def loss(self, outputs: TokenLogits, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.logits.float(), outputs.targets, reduction="sum") / max(outputs.targets.numel(), 1)

    def _loss_metrics(self, model: nn.Module, data: Seq2SeqBatches, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        total, count = 0.0, 0
        for _, batch in eval_batches(model, data, batch_size, runtime):
            out = seq2seq_forward(model, batch)
            total += float(F.cross_entropy(out.logits.float(), out.targets, reduction="sum"))
            count += out.targets.numel()
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": count}

    def _generated(self, model: nn.Module, data: Seq2SeqBatches, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        from tuneforge.eval.seq2seq import generation_metrics

        records = data.records
        if records is None:
            return {}
        n = min(len(records), self.cfg.max_generate_samples or len(records))
        hyps = generate_targets(model, self.tokenizer, records.sources[:n], self.cfg,
                                max_source=self.run.data.max_length, batch_size=batch_size, runtime=runtime)
        out = generation_metrics(hyps, records.targets[:n], stemming=self.cfg.rouge_stemming)
        out["generated"] = n
        return out

    def evaluate(self, model: nn.Module, data: Seq2SeqBatches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        """Loss and perplexity; BLEU/ROUGE too with ``task.generate_eval=true``."""
        metrics = self._loss_metrics(model, data, batch_size, runtime)
        if self.cfg.generate_eval:
            metrics.update(self._generated(model, data, batch_size, runtime))
        return metrics

    def evaluate_final(self, model: nn.Module, data: Seq2SeqBatches, *, batch_size: int,
                       runtime: Runtime) -> dict[str, Any]:
        """The end-of-run and ``tuneforge eval`` evaluation: with generated-text metrics unless
        ``task.generate_eval=false``."""
        metrics = self._loss_metrics(model, data, batch_size, runtime)
        if self.cfg.generate_eval is not False:
            metrics.update(self._generated(model, data, batch_size, runtime))
        return metrics

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the HF folder (its generation config carries the special token ids)."""

    def baseline_metrics(self, train: Any, records: Seq2SeqRecords) -> dict[str, float]:
        """``copy_*``: BLEU/ROUGE of the source's first sentence as the output (the lead baseline of
        summarisation; for translation it shows how much of the target is copied text)."""
        from tuneforge.eval.seq2seq import generation_metrics

        if self.cfg.generate_eval is False:
            return {}
        n = min(len(records), self.cfg.max_generate_samples or len(records))
        firsts = [s.split(". ")[0].strip() for s in records.sources[:n]]
        m = generation_metrics(firsts, records.targets[:n], stemming=self.cfg.rouge_stemming)
        return {f"copy_{k}": v for k, v in m.items() if k in ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum")}

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from tuneforge.methods.saved import load_trained

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_trained(AutoModelForSeq2SeqLM, model_dir, dtype=torch.float32).eval()
        self._use(tokenizer, model)
        return Built(model, tokenizer)

    def read_split(self, path: Path) -> Seq2SeqRecords:
        records = self._read(path)
        records.split = "eval"
        return records

    def read_inputs(self, path: Path) -> tuple[list[str], None]:
        """Sources to translate/summarise: a table's source column, or a text file's lines."""
        from tuneforge.data.readers import column_values, read_table, resolve_column

        d = self.run.data
        table = read_table(path, d.format, header=d.header, quoting=d.quoting, delimiter=d.delimiter,
                           encoding=d.encoding, extra_fields=d.extra_fields)
        column = "text" if table.columns == ["text"] else resolve_column(table, self.cfg.source_column,
                                                                        "task.source_column")
        values = column_values(table, column, role="source column")
        return [" ".join(v) if isinstance(v, list) else str(v) for v in values], None

    def predict(self, built: Built, texts: list[str], pairs: list[str] | None, *, batch_size: int,
                runtime: Runtime) -> list[dict[str, Any]]:
        outs = generate_targets(built.model, built.tokenizer, texts, self.cfg, max_source=self.run.data.max_length,
                                batch_size=batch_size, runtime=runtime, progress=len(texts) > batch_size)
        return [{"prediction": o} for o in outs]


OBJECTIVE = Seq2SeqObjective
