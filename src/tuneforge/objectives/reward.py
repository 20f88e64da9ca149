"""Reward models (``task: reward``): a scalar head trained on preference pairs with the Bradley-Terry loss.

The model is the architecture's ``AutoModelForSequenceClassification`` with one label, on an encoder (the
first token's state) or a decoder (the last real token's state; pad = EOS when the tokenizer has none), so
a run directory loads in plain transformers. Each example is the rendered conversation (prompt + response:
the tokenizer's chat template, else plain "User: ... / Assistant: ..." paragraphs), cut from the left to
``data.max_length``. Chosen and rejected conversations of B pairs go through the model as one [2B, T] batch.

Loss (Ouyang et al. 2022, eq. 1; see `preference_losses.bradley_terry_loss`): ``-log sigmoid(r_c - r_r -
margin)`` with an optional ``task.margin_column`` and ``task.center_rewards_coefficient``. Metrics:
``accuracy`` (pairwise: r_c > r_r, a tie counting half), ``margin`` (mean r_c - r_r), ``loss``, mean ``chosen_reward`` /
``rejected_reward``; the model-free ``length_accuracy`` baseline (the longer response is chosen, ties
count half). ``tuneforge predict`` scores texts (or prompt/response pairs, rendered as in training).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.pairs import PairBatches, encode_texts, resolve_text_template
from tuneforge.data.preference import Preference, Preferences
from tuneforge.data.readers import column_values, read_table, resolve_column
from tuneforge.errors import ConfigError
from tuneforge.objectives._preference import load_preference_splits, preference_reader
from tuneforge.objectives.base import Built, TaskData, eval_batches
from tuneforge.objectives.configs.reward import RewardConfig
from tuneforge.objectives.preference_losses import bradley_terry_loss, pairwise_accuracy

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = ["RewardConfig", "RewardObjective", "length_accuracy"]


def length_accuracy(prefs: Preferences) -> float:
    """Share of pairs whose chosen response is the longer one (in characters; a tie counts half)."""
    score = sum(1.0 if len(p.chosen) > len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0
                for p in prefs.items)
    return score / max(1, len(prefs))


def _pad_model(model: nn.Module, tokenizer: Any) -> None:
    """Decoders pool the last non-pad token: they need a pad id (EOS when the tokenizer has none)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


class RewardObjective:
    """Implements the `Objective` (and `PredictiveObjective`) protocol for reward models."""

    name = "reward"
    default_metric = "accuracy"
    greater_is_better = True

    def __init__(self, run: RunConfig):
        self.run = run
        self.notes: list[str] = []
        self.template: str | None = None

    # ----------------------------------------------------------------- data
    def load_data(self, run: RunConfig) -> TaskData:
        read = preference_reader(run, paired=True, margin_key=run.task.margin_column)
        return load_preference_splits(run, read, self.notes)

    def read_split(self, path: Path) -> Preferences:
        return preference_reader(self.run, paired=True, margin_key=self.run.task.margin_column)(path)

    # ----------------------------------------------------------------- model
    def _use_template(self, tokenizer: Any) -> None:
        self.template, what = resolve_text_template(tokenizer)
        if f"rendering: {what}" not in self.notes:
            self.notes.append(f"rendering: {what}")

    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, id2label={0: "reward"}, label2id={"reward": 0},
            attn_implementation=run.model.attn_implementation, output_loading_info=True, dtype=torch.float32,
        )
        _pad_model(model, tokenizer)
        self._use_template(tokenizer)
        return Built(model, tokenizer, sorted(info.get("missing_keys", [])))

    def prepare(self, records: Preferences, tokenizer: Any, run: RunConfig) -> PairBatches:
        if self.template is None:
            self._use_template(tokenizer)
        cols, stats = encode_texts(tokenizer, self.template, records, max_length=run.data.max_length)
        note = f"{records.split or records.source}: {stats['examples']} pairs"
        if stats["truncated"]:
            note += (f", {stats['truncated']} of {2 * stats['examples']} conversations longer than "
                     f"data.max_length={run.data.max_length} cut from the left")
        if note not in self.notes:
            self.notes.append(note)
        extra = {}
        if run.task.margin_column is not None:
            extra["margin"] = torch.tensor([p.margin for p in records.items], dtype=torch.float32)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return PairBatches(cols, ("chosen", "rejected"), pad, extra=extra, group_by_length=run.train.group_by_length)

    # ----------------------------------------------------------------- training
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output on the [2B, T] batch: ``.logits`` [2B, 1], the chosen rows first."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = outputs.logits.float().squeeze(-1).chunk(2)
        return bradley_terry_loss(chosen, rejected, batch.get("margin"), self.run.task.center_rewards_coefficient)

    def scores(self, model: nn.Module, data: PairBatches, *, batch_size: int,
               runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (CPU) of every chosen and every rejected conversation of ``data``, in order: [N], [N]."""
        chosen, rejected = torch.empty(len(data)), torch.empty(len(data))
        for indices, batch in eval_batches(model, data, batch_size, runtime):
            c, r = self.forward(model, batch).logits.float().squeeze(-1).cpu().chunk(2)
            idx = torch.as_tensor(indices)
            chosen[idx], rejected[idx] = c, r
        return chosen, rejected

    def evaluate(self, model: nn.Module, data: PairBatches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        chosen, rejected = self.scores(model, data, batch_size=batch_size, runtime=runtime)
        margin = data.extra.get("margin")
        loss = bradley_terry_loss(chosen, rejected, margin, self.run.task.center_rewards_coefficient)
        return {"accuracy": pairwise_accuracy(chosen, rejected), "margin": float((chosen - rejected).mean()),
                "loss": float(loss), "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
                "pairs": len(data)}

    def baseline_metrics(self, train: Preferences, records: Preferences) -> dict[str, float]:
        """``length_accuracy``: the pairwise accuracy of "the longer response is chosen"."""
        return {"length_accuracy": length_accuracy(records)}

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the HF folder (a one-label sequence classifier)."""

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tuneforge.methods.saved import load_trained

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_trained(AutoModelForSequenceClassification, model_dir, dtype=torch.float32)
        _pad_model(model, tokenizer)
        self._use_template(tokenizer)
        return Built(model.eval(), tokenizer)

    def read_inputs(self, path: Path) -> tuple[list[str], list[str] | None]:
        """Texts to score (``data.text_column``), or prompts and responses (``data.text_pair_column`` names the
        response column): a pair is rendered as a conversation, as in training."""
        d = self.run.data
        table = read_table(path, d.format, encoding=d.encoding)
        texts = [str(t) for t in column_values(table, resolve_column(table, d.text_column, "text column"), role="text")]
        pairs = None
        if d.text_pair_column is not None:
            col = resolve_column(table, d.text_pair_column, "response column")
            pairs = [str(t) for t in column_values(table, col, role="response")]
        return texts, pairs

    def predict(self, built: Built, texts: list[str], pairs: list[str] | None, *, batch_size: int,
                runtime: Runtime) -> list[dict[str, Any]]:
        """``{"reward": score}`` per text: a plain text is scored as it is; with ``pairs``, each (prompt,
        response) is rendered as a one-turn conversation first."""
        tok = built.tokenizer
        if self.template is None:
            self._use_template(tok)
        if pairs is not None:
            prefs = Preferences([Preference([{"role": "user", "content": t}], r, r, i + 1)
                                 for i, (t, r) in enumerate(zip(texts, pairs, strict=True))], "input", True)
            cols, _ = encode_texts(tok, self.template, prefs, max_length=self.run.data.max_length)
            ids = cols["chosen_input_ids"]
        else:
            before = tok.truncation_side
            tok.truncation_side = "left"
            try:
                ids = tok(texts, truncation=True, max_length=self.run.data.max_length, verbose=False,
                          return_attention_mask=False)["input_ids"]
            finally:
                tok.truncation_side = before
        if not ids:
            raise ConfigError("nothing to score: give texts or an --input file")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        data = PairBatches({"chosen_input_ids": ids}, ("chosen",), pad, group_by_length=False)
        out = torch.empty(len(data))
        for indices, batch in eval_batches(built.model, data, batch_size, runtime):
            out[torch.as_tensor(indices)] = self.forward(built.model, batch).logits.float().squeeze(-1).cpu()
        return [{"reward": round(float(r), 6)} for r in out]


OBJECTIVE = RewardObjective
