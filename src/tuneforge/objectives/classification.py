"""Sequence classification (single sentence or sentence pair, binary or multi-class).

The model is the architecture's ``AutoModelForSequenceClassification`` head, so a run directory loads in
plain transformers. The label set comes from the training split (ints sorted numerically, strings
alphabetically) and is stored in the model config (``id2label``) and ``labels.json``. Loss is
cross-entropy, optionally class-weighted (``task.class_weights: balanced`` uses n / (k * count_c), as
scikit-learn's ``compute_class_weight``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import Batches, TokenBatches
from tuneforge.data.readers import Table, column_values, read_table, resolve_column
from tuneforge.data.tokenize import tokenize_texts
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.classification import classification_metrics
from tuneforge.objectives.base import Built, TaskData, eval_batches
from tuneforge.objectives.configs.classification import ClassificationConfig
from tuneforge.objectives.first_token import first_token_only, use_first_token_last_layer
from tuneforge.track.atomic import atomic_write_json

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["ClassificationConfig", "ClassificationObjective", "Examples"]


@dataclass
class Examples:
    """One validated split: texts (and pairs) with class ids, and the source line of each row."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | None
    source: str
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int], source: str | None = None) -> Examples:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Examples(pick(self.texts), pick(self.pairs) if self.pairs else None,
                        pick(self.labels) if self.labels is not None else None, source or self.source, pick(self.lines))


def _read(run: RunConfig, path: Path) -> Table:
    d = run.data
    return read_table(path, d.format, header=d.header, quoting=d.quoting, delimiter=d.delimiter, encoding=d.encoding,
                      extra_fields=d.extra_fields)


def _sort_labels(values: list[Any]) -> list[Any]:
    uniq = set(values)
    as_int = {}
    for v in uniq:
        try:
            as_int[v] = int(str(v).strip())
        except ValueError:
            return sorted(uniq, key=str)
    return sorted(uniq, key=lambda v: as_int[v])


class ClassificationObjective:
    """Implements the `Objective` protocol for sequence classification."""

    name = "classification"
    default_metric = "accuracy"
    greater_is_better = True

    def __init__(self, run: RunConfig):
        self.run = run
        self.weights: torch.Tensor | None = None
        self.labels: list[str] = []
        self._first_token = False  # the model's last layer computes position 0 only (`objectives.first_token`)

    # ----------------------------------------------------------------- data
    def _examples(self, path: Path, label_ids: dict[str, int] | None) -> tuple[Examples, list[str]]:
        d = self.run.data
        table = _read(self.run, path)
        text_col = resolve_column(table, d.text_column, "text column")
        texts = [str(t) for t in column_values(table, text_col, role="text")]
        pairs = None
        if d.text_pair_column is not None:
            pair_col = resolve_column(table, d.text_pair_column, "text pair column")
            pairs = [str(t) for t in column_values(table, pair_col, role="text pair")]
        label_col = resolve_column(table, d.label_column, "label column")
        raw = [str(v).strip() for v in column_values(table, label_col, role="label")]
        if label_ids is None:
            names = [str(x) for x in _sort_labels(raw)]
            if len(names) < 2:
                raise DataError(f"label column '{label_col}' has a single class ({names[0]!r}); need at least 2", path)
            label_ids = {n: i for i, n in enumerate(names)}
        labels = []
        for value, line in zip(raw, table.lines, strict=True):
            if value not in label_ids:
                raise DataError(f"unknown label {value!r} (training labels: {', '.join(label_ids)})", path, line)
            labels.append(label_ids[value])
        return Examples(texts, pairs, labels, str(path), list(table.lines)), list(label_ids)

    def load_data(self, run: RunConfig) -> TaskData:
        d = run.data
        if d.train is None:
            raise ConfigError("a training file is required (e.g. data.train=train.csv)", key="data.train")
        train, names = self._examples(d.train, None)
        ids = {n: i for i, n in enumerate(names)}
        notes = []
        if d.max_train_samples and d.max_train_samples < len(train.labels):
            train = train.subset(_sample(len(train.labels), d.max_train_samples, run.train.seed))
            notes.append(f"train: a seeded random sample of {d.max_train_samples} rows of {d.train}")
        if d.validation is not None:
            val, _ = self._examples(d.validation, ids)
        else:
            train, val = _carve(train, d.validation_split, run.train.seed)
            notes.append(f"validation: {len(val.labels)} rows carved from {d.train} (stratified, seed {run.train.seed})")
        if d.max_eval_samples and d.max_eval_samples < len(val.labels):
            val = val.subset(_sample(len(val.labels), d.max_eval_samples, run.train.seed))
        splits = {"train": train, "validation": val}
        if d.test is not None:
            splits["test"] = self._examples(d.test, ids)[0]
        self.labels = names
        self.weights = self._class_weights(train)
        return TaskData(splits=splits, info={"labels": names, "pair": train.pairs is not None}, notes=notes)

    def _class_weights(self, train: Examples) -> torch.Tensor | None:
        cw = self.run.task.class_weights
        k = len(self.labels)
        if cw is None:
            return None
        if cw == "balanced":
            counts = np.bincount(train.labels, minlength=k).astype(np.float64)
            return torch.tensor(len(train.labels) / (k * np.maximum(counts, 1)), dtype=torch.float32)
        if isinstance(cw, list):
            if len(cw) != k:
                raise ConfigError(f"{len(cw)} weights for {k} classes ({', '.join(self.labels)})", key="task.class_weights")
            return torch.tensor(cw, dtype=torch.float32)
        unknown = set(cw) - set(self.labels)
        if unknown:
            raise ConfigError(f"unknown labels {sorted(unknown)}; allowed: {', '.join(self.labels)}", key="task.class_weights")
        return torch.tensor([float(cw.get(n, 1.0)) for n in self.labels], dtype=torch.float32)

    # ----------------------------------------------------------------- model
    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        names = data.info["labels"]
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, attn_implementation=run.model.attn_implementation,
            output_loading_info=True, dtype=torch.float32,
        )
        if model.config.pad_token_id is None:  # decoders: pooling needs a pad id
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        self._first_token = run.train.first_token_last_layer and use_first_token_last_layer(model)
        return Built(model, tokenizer, sorted(info.get("missing_keys", [])))

    def prepare(self, records: Examples, tokenizer: Any, run: RunConfig) -> TokenBatches:
        enc = tokenize_texts(tokenizer, records.texts, records.pairs, max_length=run.data.max_length,
                             keep_token_types=records.pairs is not None and "token_type_ids" in tokenizer.model_input_names)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if records.labels is not None:
            enc["labels"] = records.labels
        return TokenBatches(enc, pad, group_by_length=run.train.group_by_length)

    # ----------------------------------------------------------------- training
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output (``.logits`` [B, C]) on a batch; labels are not passed (the loss is ours)."""
        with first_token_only(self._first_token):
            return model(**{k: v for k, v in batch.items() if k != "labels"})

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs.logits.float()
        weight = self.weights.to(logits.device) if self.weights is not None else None
        return F.cross_entropy(logits, batch["labels"], weight=weight)

    def logits(self, model: nn.Module, data: Batches, *, batch_size: int, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (on the CPU) for every example of ``data`` in its original order (and labels when present)."""
        out: torch.Tensor | None = None
        gold: torch.Tensor | None = None
        for indices, batch in eval_batches(model, data, batch_size, runtime):
            labels = batch.pop("labels", None)
            with first_token_only(self._first_token):
                logits = model(**batch).logits.float().cpu()
            if out is None:
                out = torch.empty((len(data), logits.shape[-1]))
                gold = torch.empty(len(data), dtype=torch.long) if labels is not None else None
            idx = torch.as_tensor(indices)
            out[idx] = logits
            if gold is not None:
                gold[idx] = labels.cpu()
        return out, gold

    def evaluate(self, model: nn.Module, data: Batches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        logits, gold = self.logits(model, data, batch_size=batch_size, runtime=runtime)
        metrics = classification_metrics(gold.tolist(), logits.argmax(-1).tolist(), self.labels)
        metrics["loss"] = float(F.cross_entropy(logits, gold, weight=self.weights))
        return metrics

    def feature_head(self, model: nn.Module) -> tuple[Callable[[dict], torch.Tensor], nn.Module]:
        """For the frozen method: (batch -> pooled-token hidden state, module mapping features to logits)."""
        return _pooled_features(model), _FeatureHead(model)

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        atomic_write_json(out_dir / "labels.json", {"labels": data.info["labels"]})

    # ----------------------------------------------------------------- after training
    def load_state(self, model_dir: Path) -> None:
        """The label set of a saved classifier (``labels.json``)."""
        self.labels = read_label_map(model_dir)

    def from_saved(self, model_dir: Path) -> Built:
        """Load a trained classifier folder (plain transformers) and its label set."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tuneforge.methods.saved import load_trained

        self.load_state(model_dir)
        model = load_trained(AutoModelForSequenceClassification, model_dir, dtype=torch.float32)
        self._first_token = self.run.train.first_token_last_layer and use_first_token_last_layer(model)
        return Built(model.eval(), AutoTokenizer.from_pretrained(model_dir))

    def read_split(self, path: Path) -> Examples:
        """Read and validate an evaluation file against the trained label set."""
        return self._examples(path, {n: i for i, n in enumerate(self.labels)})[0]

    def read_inputs(self, path: Path) -> tuple[list[str], list[str] | None]:
        """Texts (and pairs) of a prediction input file; labels are not needed."""
        d = self.run.data
        table = _read(self.run, path)
        texts = [str(t) for t in column_values(table, resolve_column(table, d.text_column, "text column"), role="text")]
        pairs = None
        if d.text_pair_column is not None:
            col = resolve_column(table, d.text_pair_column, "text pair column")
            pairs = [str(t) for t in column_values(table, col, role="text pair")]
        return texts, pairs

    def predict(self, built: Built, texts: list[str], pairs: list[str] | None, *, batch_size: int,
                runtime: Runtime) -> list[dict[str, Any]]:
        """Label and class probabilities for each text (in input order)."""
        ex = Examples(texts, pairs, None, "input", list(range(1, len(texts) + 1)))
        data = self.prepare(ex, built.tokenizer, self.run)
        logits, _ = self.logits(built.model, data, batch_size=batch_size, runtime=runtime)
        probs = torch.softmax(logits, -1)
        return [
            {"label": self.labels[int(p.argmax())], **{f"p_{n}": round(float(v), 6) for n, v in zip(self.labels, p, strict=True)}}
            for p in probs
        ]

    @staticmethod
    def baseline_metrics(train: Examples, evaluation: Examples) -> dict[str, float]:
        """``majority_accuracy``: accuracy of always predicting the most frequent training class."""
        top = Counter(train.labels).most_common(1)[0][0]
        return {"majority_accuracy": sum(1 for y in evaluation.labels if y == top) / max(1, len(evaluation.labels))}


def _sample(n: int, k: int, seed: int) -> list[int]:
    """A seeded random sample of k of n row indices, kept in file order (files are often sorted by label)."""
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def _carve(train: Examples, share: float, seed: int) -> tuple[Examples, Examples]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(train.labels))
    counts = Counter(train.labels)
    stratify = train.labels if min(counts.values()) >= 2 else None
    try:
        tr, va = train_test_split(idx, test_size=share, random_state=seed, stratify=stratify)
    except ValueError as e:
        raise DataError(f"cannot carve a validation split ({e}); give data.validation", train.source) from None
    return train.subset(sorted(tr)), train.subset(sorted(va))


def _is_decoder_head(model: nn.Module) -> bool:
    return hasattr(model, "score") and not hasattr(model, "classifier")


def _pooled_features(model: nn.Module) -> Callable[[dict], torch.Tensor]:
    """The hidden state the classification head reads: first token (encoders) or last real token (decoders)."""
    decoder = _is_decoder_head(model)

    def extract(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model.base_model(**inputs).last_hidden_state  # [B, T, H]
        if not decoder:
            return hidden[:, 0]
        last = batch["attention_mask"].sum(-1) - 1  # right padding
        return hidden[torch.arange(hidden.shape[0]), last]

    return extract


class _FeatureHead(nn.Module):
    """Maps cached pooled features [B, H] to logits with the model's own head modules (shared weights)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        base = model.base_model
        self.kind = "decoder" if _is_decoder_head(model) else ("pooler" if getattr(base, "pooler", None) is not None else "sequence")

    def forward(self, features: torch.Tensor, **_: Any):
        from transformers.modeling_outputs import SequenceClassifierOutput

        m = self.model
        if self.kind == "decoder":
            logits = m.score(features)
        elif self.kind == "pooler":  # BERT: pooler(dense+tanh on token 0) -> dropout -> classifier
            pooled = m.base_model.pooler(features[:, None, :])
            logits = m.classifier(m.dropout(pooled))
        else:  # RoBERTa-style heads slice token 0 themselves
            logits = m.classifier(features[:, None, :])
        return SequenceClassifierOutput(logits=logits)


OBJECTIVE = ClassificationObjective


def read_label_map(model_dir: Path) -> list[str]:
    """Class names of a saved classifier, from ``labels.json`` (or the config's id2label)."""
    p = model_dir / "labels.json"
    if p.is_file():
        return json.loads(p.read_text(encoding="utf-8"))["labels"]
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
