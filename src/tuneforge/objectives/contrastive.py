"""Contrastive sentence embeddings: an encoder whose pooled vectors put related sentences close together.

Data shapes (see `configs.contrastive`): pairs (anchor, positive), triplets (+ hard negative), scored pairs
(STS: two sentences and a similarity score) and unsupervised text (SimCSE, Gao et al. 2021: the sentence is
its own positive, the two views differing by dropout only).

Losses:

* MNRL, "multiple negatives ranking" (Henderson et al. 2017; sentence-transformers'
  ``MultipleNegativesRankingLoss``): ``cross_entropy(scale * cos(a_i, [p; n]_j), i)``: each anchor must pick
  its own positive among every positive (and hard negative) of the batch. In-batch duplicates of a positive
  would be false negatives: their scores are masked out of the row (a row keeps its own positive);
* CoSENT (Su 2022; sentence-transformers' ``CoSENTLoss``): ``log(1 + sum_{s_i > s_j} exp(scale * (cos_j -
  cos_i)))`` over the batch's pairs: it ranks the pairs by cosine in the order of their gold scores.

The model is the architecture's bare ``AutoModel``; the sentence vector is the attention-masked mean of the
last hidden states (or [CLS]). Evaluation: Spearman and Pearson correlation of cosine with the gold scores
(scored pairs; the STS benchmark's figures, Cer et al. 2017) or recall@1/@10 of each anchor retrieving its
positive among all positives of the split (pairs), and the loss. The saved folder is also a
sentence-transformers folder (``modules.json``, pooling config), so ``SentenceTransformer(run/"model")``
loads it (full fine-tuning, or after ``tuneforge merge``) and gives the vectors ``tuneforge embed`` gives.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import TokenBatches
from tuneforge.data.readers import column_values, read_table, resolve_column
from tuneforge.data.splits import train_validation
from tuneforge.data.tokenize import tokenize_texts
from tuneforge.errors import ConfigError, DataError
from tuneforge.objectives.base import Built, TaskData, eval_batches
from tuneforge.objectives.configs.contrastive import ContrastiveConfig
from tuneforge.track.atomic import atomic_write_json

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["ContrastiveConfig", "ContrastiveObjective", "Embeddings", "Sentences", "cosent_loss", "mnrl_loss", "pool"]

_SIDES = ("a", "b", "c")  # anchor, positive, negative


@dataclass
class Sentences:
    """One split: anchors, optional positives / negatives / scores, and each row's line."""

    anchors: list[str]
    positives: list[str] | None
    negatives: list[str] | None
    scores: list[float] | None
    source: str
    lines: list[int]

    def __len__(self) -> int:
        return len(self.anchors)

    def subset(self, idx: Sequence[int]) -> Sentences:
        pick = lambda xs: [xs[i] for i in idx] if xs is not None else None  # noqa: E731
        return Sentences(pick(self.anchors), pick(self.positives), pick(self.negatives), pick(self.scores),
                         self.source, pick(self.lines))


@dataclass
class Embeddings:
    """Outputs of a batch: the sentence vectors per side and ``logits``, the scaled similarity matrix the
    MNRL loss reads (anchors x candidates), or the scaled cosine of each pair for CoSENT."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor | None
    logits: torch.Tensor


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sentence vectors from token vectors: the attention-masked mean, or the first ([CLS]) token."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def mnrl_loss(a: torch.Tensor, candidates: torch.Tensor, scale: float, same: torch.Tensor | None = None) -> torch.Tensor:
    """``cross_entropy(scale * cos(a, candidates), arange(B))``; ``same[i, j]`` masks candidate j out of row i."""
    scores = scale * F.normalize(a.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    if same is not None:
        scores = scores.masked_fill(same, float("-inf"))
    return F.cross_entropy(scores, torch.arange(a.shape[0], device=a.device))


def cosent_loss(cos: torch.Tensor, gold: torch.Tensor, scale: float) -> torch.Tensor:
    """``log(1 + sum_{gold_i > gold_j} exp(scale * (cos_j - cos_i)))`` (Su 2022)."""
    diff = scale * (cos[None, :] - cos[:, None]).float()  # [i, j] = scale * (cos_j - cos_i)
    diff = diff.masked_fill(~(gold[:, None] > gold[None, :]), float("-inf"))
    return torch.logsumexp(torch.cat([torch.zeros(1, device=cos.device), diff.flatten()]), 0)


class PairBatches(TokenBatches):
    """Token batches with one token column per side (``input_ids``, ``input_ids_b``, ``input_ids_c``), each
    padded to its own longest row, with its attention mask."""

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for side in _SIDES:
            key = "input_ids" if side == "a" else f"input_ids_{side}"
            if key not in self.columns:
                continue
            rows = [self.columns[key][i] for i in indices]
            width = max(len(r) for r in rows)
            ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for k, r in enumerate(rows):
                ids[k, : len(r)], mask[k, : len(r)] = r, 1
            suffix = "" if side == "a" else f"_{side}"
            out[f"input_ids{suffix}"], out[f"attention_mask{suffix}"] = torch.from_numpy(ids), torch.from_numpy(mask)
        for key in ("scores", "key_b"):
            if key in self.columns:
                out[key] = torch.as_tensor([self.columns[key][i] for i in indices])
        return out


class ContrastiveObjective:
    """Implements the `Objective` protocol for sentence embeddings."""

    name = "contrastive"
    default_metric = "spearman"
    greater_is_better = True

    def __init__(self, run: RunConfig):
        self.run = run
        self.cfg: ContrastiveConfig = run.task

    # ----------------------------------------------------------------- data
    def _read(self, path: Path) -> Sentences:
        d, t = self.run.data, self.cfg
        table = read_table(path, d.format, header=d.header, quoting=d.quoting, delimiter=d.delimiter,
                           encoding=d.encoding, extra_fields=d.extra_fields)
        text = lambda spec, role: [str(v) for v in column_values(table, resolve_column(table, spec, role), role=role)]  # noqa: E731
        anchors = text(d.text_column, "text column")
        positives = text(d.text_pair_column, "text pair column") if d.text_pair_column is not None else None
        negatives = text(t.negative_column, "negative column") if t.negative_column is not None else None
        scores = None
        has_score = positives is not None and _has_column(table, d.label_column)
        if t.scored or (t.scored is None and has_score and negatives is None):
            col = resolve_column(table, d.label_column, "score column")
            scores = []
            for value, line in zip(column_values(table, col, role="score"), table.lines, strict=True):
                try:
                    score = float(value)
                except (TypeError, ValueError):
                    raise DataError(f"score {value!r} is not a number", path, line) from None
                low, high = t.score_range if t.score_range is not None else (-math.inf, math.inf)
                if not low <= score <= high or math.isnan(score):
                    raise DataError(f"score {value!r} is outside task.score_range [{low:g}, {high:g}]", path, line)
                scores.append(score)
        return Sentences(anchors, positives, negatives, scores, str(path), list(table.lines))

    def load_data(self, run: RunConfig) -> TaskData:
        d = run.data
        if d.train is None:
            raise ConfigError("a training file is required (e.g. data.train=sts-train.csv)", key="data.train")
        train, val, notes = train_validation(self._read(d.train), lambda: self._read(d.validation), d,
                                             run.train.seed, what="rows")
        if self._loss(train) == "cosent" and train.scores is None:
            raise ConfigError("task.loss=cosent needs scored pairs (data.text_pair_column and a score in "
                              "data.label_column)", key="task.loss")
        # the headline metric follows what the validation rows can measure
        if val.scores is not None:
            self.default_metric = "spearman"
        elif val.positives is not None:
            self.default_metric = "recall@1"
        else:
            self.default_metric, self.greater_is_better = "loss", False
        shape = ("scored pairs" if train.scores is not None else "triplets" if train.negatives is not None
                 else "pairs" if train.positives is not None else "unsupervised text (SimCSE)")
        notes.append(f"contrastive data: {shape}; loss {self._loss(train)}")
        return TaskData({"train": train, "validation": val}, {"shape": shape, "loss": self._loss(train)}, notes)

    def _loss(self, records: Sentences) -> str:
        if self.cfg.loss != "auto":
            return self.cfg.loss
        return "cosent" if records.scores is not None else "mnrl"

    # ----------------------------------------------------------------- model
    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModel, AutoTokenizer

        model, info = AutoModel.from_pretrained(model_path, attn_implementation=run.model.attn_implementation,
                                                output_loading_info=True, dtype=torch.float32)
        return Built(model, AutoTokenizer.from_pretrained(model_path), sorted(info.get("missing_keys", [])))

    def prepare(self, records: Sentences, tokenizer: Any, run: RunConfig) -> PairBatches:
        max_len = run.data.max_length
        columns: dict[str, Any] = {"input_ids": tokenize_texts(tokenizer, records.anchors, max_length=max_len)["input_ids"]}
        second = records.positives if records.positives is not None else records.anchors  # SimCSE: itself
        columns["input_ids_b"] = tokenize_texts(tokenizer, second, max_length=max_len)["input_ids"]
        if records.negatives is not None:
            columns["input_ids_c"] = tokenize_texts(tokenizer, records.negatives, max_length=max_len)["input_ids"]
        if records.scores is not None:
            columns["scores"] = [float(s) for s in records.scores]
        columns["key_b"] = [zlib.crc32(t.encode("utf-8")) for t in second]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return PairBatches(columns, pad, group_by_length=run.train.group_by_length)

    # ----------------------------------------------------------------- training
    def embed(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask)
        return pool(out.last_hidden_state, mask, self.cfg.pooling)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Embeddings:
        a = self.embed(model, batch["input_ids"], batch["attention_mask"])
        b = self.embed(model, batch["input_ids_b"], batch["attention_mask_b"])
        c = self.embed(model, batch["input_ids_c"], batch["attention_mask_c"]) if "input_ids_c" in batch else None
        if "scores" in batch and self.cfg.loss in ("auto", "cosent"):
            logits = self.cfg.scale * F.cosine_similarity(a.float(), b.float(), dim=-1)
        else:
            cand = b if c is None else torch.cat([b, c])
            logits = self.cfg.scale * F.normalize(a.float(), dim=-1) @ F.normalize(cand.float(), dim=-1).T
        return Embeddings(a, b, c, logits)

    def loss(self, outputs: Embeddings, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if outputs.logits.dim() == 1:  # CoSENT: scaled cosine per pair
            return cosent_loss(outputs.logits / self.cfg.scale, batch["scores"], self.cfg.scale)
        cand = outputs.b if outputs.c is None else torch.cat([outputs.b, outputs.c])
        key = batch["key_b"]
        same = key[:, None] == key[None, :]
        same.fill_diagonal_(False)  # a duplicate of my positive elsewhere in the batch is not a negative
        if outputs.c is not None:
            same = torch.cat([same, torch.zeros_like(same)], dim=1)
        return mnrl_loss(outputs.a, cand, self.cfg.scale, same)

    def evaluate(self, model: nn.Module, data: PairBatches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        """Spearman/Pearson x 100 of cosine vs gold (scored pairs) or recall@1/@10 (pairs), and the loss."""
        from scipy.stats import pearsonr, spearmanr

        n = len(data)
        a = torch.empty(0)
        vecs: dict[str, torch.Tensor] = {}
        total = 0.0
        for indices, batch in eval_batches(model, data, batch_size, runtime):
            out = self.forward(model, batch)
            total += float(self.loss(out, batch)) * len(indices)
            for side in ("a", "b"):
                v = getattr(out, side).float().cpu()
                if side not in vecs:
                    vecs[side] = torch.empty((n, v.shape[-1]))
                vecs[side][indices] = v
        a, b = F.normalize(vecs["a"], dim=-1), F.normalize(vecs["b"], dim=-1)
        metrics: dict[str, Any] = {"loss": total / max(1, n)}
        if "scores" in data.columns:
            cos = (a * b).sum(-1).numpy()
            gold = np.asarray(data.columns["scores"])
            metrics["spearman"] = float(spearmanr(cos, gold).statistic) * 100
            metrics["pearson"] = float(pearsonr(cos, gold).statistic) * 100
        else:
            sims = a @ b.T
            own = sims.diagonal()[:, None]
            rank = (sims > own).sum(1)  # positives scoring above the true one
            metrics["recall@1"] = float((rank < 1).float().mean())
            metrics["recall@10"] = float((rank < 10).float().mean())
        return metrics

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """The sentence-transformers layout: a Transformer module then a Pooling module."""
        hidden = None
        cfg_file = out_dir / "config.json"
        if cfg_file.is_file():
            import json

            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            hidden = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd")
        atomic_write_json(out_dir / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
        atomic_write_json(out_dir / "sentence_bert_config.json",
                          {"max_seq_length": self.run.data.max_length, "do_lower_case": False})
        (out_dir / "1_Pooling").mkdir(exist_ok=True)
        atomic_write_json(out_dir / "1_Pooling" / "config.json", {
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": self.cfg.pooling == "cls",
            "pooling_mode_mean_tokens": self.cfg.pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False})

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        from transformers import AutoModel, AutoTokenizer

        from tuneforge.methods.saved import load_trained

        model = load_trained(AutoModel, model_dir, dtype=torch.float32)
        return Built(model.eval(), AutoTokenizer.from_pretrained(model_dir))

    def read_split(self, path: Path) -> Sentences:
        return self._read(path)

    def encode(self, built: Built, texts: list[str], *, batch_size: int, runtime: Runtime) -> torch.Tensor:
        """Sentence vectors of ``texts`` (in order, not normalised): what ``tuneforge embed`` writes."""
        data = self.prepare(Sentences(list(texts), None, None, None, "input", []), built.tokenizer, self.run)
        out = torch.empty(0)
        for indices, batch in eval_batches(built.model, data, batch_size, runtime):
            v = self.embed(built.model, batch["input_ids"], batch["attention_mask"]).float().cpu()
            if out.numel() == 0:
                out = torch.empty((len(texts), v.shape[-1]))
            out[indices] = v
        return out

    @staticmethod
    def baseline_metrics(train: Sentences, records: Sentences) -> dict[str, float]:
        """None: no model-free reference number here."""
        return {}


def _has_column(table: Any, spec: str | int) -> bool:
    try:
        resolve_column(table, spec, "score column")
    except DataError:
        return False
    return True


OBJECTIVE = ContrastiveObjective
