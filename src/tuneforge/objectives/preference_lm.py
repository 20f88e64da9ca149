"""What the preference objectives on a causal LM (``dpo``, ``simpo``, ``kto``) share.

Data: preference rows (see `data.preference`) rendered with the chat template (``task.template``, as SFT:
``auto`` = the tokenizer's own, else alpaca) and tokenized once; only response tokens are scored, prompts
cut from the left to ``task.max_prompt_length`` and responses from the right to ``data.max_length`` (counts
in the run's notes; see `data.pairs.encode_responses`). A batch of B examples is one [n_sides * B, T]
forward pass (chosen rows first).

Log-probs: ``log pi(y | x)`` summed over the response tokens (`response_logps`), computed from the
objective's `forward` with the same supervised-positions-only output layer as SFT (`causal_lm.lm_forward`),
fused with the loss when that layer is frozen (``train.chunked_cross_entropy``, `chunked_ce`: no [N, vocab]
logits are kept; they are computed again only if something reads ``PreferenceOutputs.logits``).

The reference model (DPO, KTO: ``needs_reference``) is the base model *before* the method is applied:

* by default its log-probs are precomputed once in `build` (the objective has the freshly loaded base
  model there, before any method wraps it or a checkpoint is resumed into it) for every split, and travel
  with the batches as ``ref_logps`` (TRL's ``precompute_ref_log_probs``): no second model in memory and no
  reference forward per step, for every method alike;
* `use_reference` binds a live `methods.base.Reference` (``MethodRuntime.reference(model)``: adapters off,
  a frozen copy, swapped-in weights) instead: then log-probs are computed inside that context per batch,
  under ``no_grad``, for batches without precomputed ones;
* after training (``tuneforge eval RUN --data PAIRS``), `from_saved` loads the base model named in the
  run's config as the reference of new files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.chat import resolve_template
from tuneforge.data.pairs import PairBatches, encode_responses
from tuneforge.data.preference import Preferences
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.lm import IGNORE_INDEX
from tuneforge.objectives._preference import load_preference_splits, preference_reader
from tuneforge.objectives.base import Built, TaskData, TokenLogits
from tuneforge.objectives.causal_lm import (
    TokenNLL,
    check_decoder,
    lm_forward,
    load_causal_lm,
    saved_causal_lm,
)
from tuneforge.objectives.chunked_ce import FusedHeads

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime
    from tuneforge.methods.base import Reference

__all__ = ["PreferenceLMObjective", "PreferenceOutputs", "response_logps"]


@dataclass
class PreferenceOutputs:
    """Outputs of one [S * B, T] batch (S sides, chosen rows first).

    Attributes:
        scored: the policy's output at the scored (response) positions (`lm_forward`; None for merged
            evaluation outputs); ``logits`` reads its next-token logits [N, V] (for run extensions).
        logps: summed response log-probs of the policy per row [S * B].
        tokens: scored response tokens per row [S * B].
        ref_logps: the reference's summed log-probs per row [S * B] (None when the objective needs none).
    """

    scored: TokenLogits | TokenNLL | None
    logps: torch.Tensor
    tokens: torch.Tensor
    ref_logps: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """Next-token logits at the scored positions [N, V] (computed on demand after a fused loss)."""
        if self.scored is None:
            raise ValueError("these preference outputs merge a whole split and keep no logits")
        return self.scored.logits


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor], fused_head: nn.Linear | None = None,
                   ) -> tuple[TokenLogits | TokenNLL, torch.Tensor, torch.Tensor]:
    """(the scored positions' output, summed log-prob per row [R], scored tokens per row [R]) of ``batch``
    (``input_ids``, ``attention_mask``, ``labels`` with -100 outside the responses); with ``fused_head``
    (`chunked_ce.FusedHeads`) the output layer returns the per-token NLL directly (`lm_forward`)."""
    out = lm_forward(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, fused_head=fused_head)
    if isinstance(out, TokenNLL):
        token_logps = -out.nll
    else:
        token_logps = -F.cross_entropy(out.logits.float(), out.targets, reduction="none")
    # Per-row sums through a dense [R, T-1] (lm_forward keeps the scored positions in this row-major order), not
    # index_add: on CUDA index_add accumulates with atomics in no fixed order, so the reference log-probs and an
    # untrained policy's, or a run and its resumed copy, would differ in the last bits.
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    dense = torch.zeros(scored.shape, dtype=token_logps.dtype, device=token_logps.device)
    return out, dense.masked_scatter(scored, token_logps).sum(1), scored.sum(1)


class PreferenceLMObjective:
    """Shared implementation (see module docstring); subclasses set ``paired``, ``needs_reference`` and
    implement ``loss`` and ``metrics``."""

    name = ""
    default_metric = "loss"
    greater_is_better = False
    paired = True
    needs_reference = True

    def __init__(self, run: RunConfig):
        self.run = run
        self.notes: list[str] = []
        self.template: str | None = None
        self.reference: Reference | None = None
        self.reference_model: nn.Module | None = None  # a base model that precomputes reference log-probs
        self._encoded: dict[int, tuple[Preferences, PairBatches]] = {}
        self._samples: Preferences | None = None
        self.fused_head = FusedHeads(run.train.chunked_cross_entropy)  # model -> its fused output layer or None

    # ----------------------------------------------------------------- data
    @property
    def sides(self) -> tuple[str, ...]:
        return ("chosen", "rejected") if self.paired else ("chosen",)

    def load_data(self, run: RunConfig) -> TaskData:
        check_decoder(run)
        data = load_preference_splits(run, preference_reader(run, paired=self.paired), self.notes)
        self._samples = data.splits["validation"]
        return data

    def read_split(self, path: Path) -> Preferences:
        return preference_reader(self.run, paired=self.paired)(path)

    def _use_template(self, tokenizer: Any) -> None:
        template, what = resolve_template(tokenizer, self.run.task.template)
        if tokenizer.chat_template != template:
            tokenizer.chat_template = template  # saved with the model: generation renders prompts the same way
        self.template = template
        if f"chat template: {what}" not in self.notes:
            self.notes.append(f"chat template: {what}")

    def _max_prompt(self) -> int:
        t, size = self.run.task, self.run.data.max_length
        return t.max_prompt_length if t.max_prompt_length is not None else size // 2

    def encode(self, records: Preferences, tokenizer: Any) -> PairBatches:
        """Tokenized ``records`` (cached per records object: `build` and `prepare` see the same splits)."""
        if (hit := self._encoded.get(id(records))) is not None and hit[0] is records:
            return hit[1]
        if self.template is None:
            self._use_template(tokenizer)
        size, max_prompt = self.run.data.max_length, self._max_prompt()
        cols, stats = encode_responses(tokenizer, self.template, records, max_length=size, max_prompt_length=max_prompt)
        note = f"{records.split or records.source}: {stats['examples']} examples"
        if stats["prompt_truncated"]:
            note += f", {stats['prompt_truncated']} prompts cut from the left to task.max_prompt_length={max_prompt}"
        if stats["response_truncated"]:
            note += f", {stats['response_truncated']} responses cut from the right to data.max_length={size}"
        if stats["dropped"]:
            note += f", {stats['dropped']} dropped (no response token left)"
        if note not in self.notes:
            self.notes.append(note)
        if not cols["keep"]:
            raise DataError(f"no example keeps a response token within data.max_length={size}; raise it",
                            records.source)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        sides = ("chosen", "rejected") if records.paired else ("chosen",)
        data = PairBatches({k: v for k, v in cols.items() if k != "keep"}, sides, pad,
                           extra=self._extra(records, cols["keep"]), group_by_length=self.run.train.group_by_length)
        self._encoded[id(records)] = (records, data)
        return data

    def _extra(self, records: Preferences, keep: list[int]) -> dict[str, torch.Tensor]:
        """Per-example tensors besides the tokens (KTO: the labels)."""
        return {}

    # ----------------------------------------------------------------- reference
    def use_reference(self, reference: Reference) -> None:
        """Compute reference log-probs inside ``reference()`` (a method's `Reference` on the model being
        trained, made right after the method was applied) for batches without precomputed ones."""
        self.reference = reference

    def precompute_reference(self, model: nn.Module, data: PairBatches, *, batch_size: int,
                             runtime: Runtime | None = None) -> None:
        """Store ``model``'s summed response log-probs per example and side in ``data.extra["ref_logps"]``,
        computed on ``runtime``'s device under its autocast (the precision training runs at, so an untrained
        policy's log-probs equal them), default: the run's runtime."""
        from tuneforge.engine.runtime import Runtime

        runtime = runtime or Runtime.for_run(self.run.train)
        was_training = model.training
        model.eval()
        n_sides = len(data.sides)
        out = torch.empty(len(data), n_sides)
        try:
            with runtime.inference():
                for indices in data.plan(0, batch_size, seed=0, shuffle=False):
                    batch = runtime.to_device(data.collate(indices))
                    _, logps, _ = response_logps(model, batch, self.fused_head(model))
                    out[torch.as_tensor(indices)] = logps.float().cpu().view(n_sides, -1).T
        finally:
            model.train(was_training)
        data.extra["ref_logps"] = out

    def _eval_batch_size(self) -> int:
        return self.run.train.eval_batch_size or 2 * self.run.train.batch_size

    # ----------------------------------------------------------------- model
    def build(self, run: RunConfig, model_path: Path, data: TaskData) -> Built:
        """The causal LM; with ``needs_reference``, its log-probs on every split now, before any method."""
        from tuneforge.engine.runtime import Runtime

        built = load_causal_lm(run, model_path, packed=False)
        self._use_template(built.tokenizer)
        if self.needs_reference:
            runtime = Runtime.for_run(run.train)
            built.model = runtime.move(built.model)  # where it trains (the pipeline's move is then a no-op)
            for records in data.splits.values():
                self.precompute_reference(built.model, self.encode(records, built.tokenizer),
                                          batch_size=self._eval_batch_size(), runtime=runtime)
            self.notes.append("reference log-probs: precomputed with the base model before training")
        return built

    def prepare(self, records: Preferences, tokenizer: Any, run: RunConfig) -> PairBatches:
        data = self.encode(records, tokenizer)
        if self.needs_reference and "ref_logps" not in data.extra and self.reference is None:
            if self.reference_model is None:
                raise ConfigError(f"task '{self.name}' needs reference log-probs for {records.source}: none were "
                                  "precomputed and no reference is bound")
            self.precompute_reference(self.reference_model, data, batch_size=self._eval_batch_size())
        return data

    # ----------------------------------------------------------------- training
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PreferenceOutputs:
        scored, logps, tokens = response_logps(model, batch, self.fused_head(model))
        ref = None
        if self.needs_reference:
            if "ref_logps" in batch:
                ref = batch["ref_logps"].T.reshape(-1).to(logps.dtype)  # [B, S] -> [S * B], chosen rows first
            elif self.reference is not None:
                with torch.no_grad(), self.reference() as ref_model:
                    ref = response_logps(ref_model, batch, self.fused_head(ref_model))[1].detach()
            else:
                raise ConfigError(f"task '{self.name}' has no reference log-probs for this batch")
        return PreferenceOutputs(scored, logps, tokens, ref)

    def evaluate(self, model: nn.Module, data: PairBatches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        from tuneforge.objectives.base import eval_batches

        parts: list[PreferenceOutputs] = []
        extras: list[dict[str, torch.Tensor]] = []
        s = len(self.sides)
        split = lambda t: t.detach().float().cpu().view(s, -1).T  # noqa: E731  [S * B] -> [B, S]
        for _, batch in eval_batches(model, data, batch_size, runtime):
            out = self.forward(model, batch)
            parts.append(PreferenceOutputs(None, split(out.logps), split(out.tokens),
                                           split(out.ref_logps) if out.ref_logps is not None else None))
            extras.append({k: v.cpu() for k, v in batch.items() if k in data.extra and k != "ref_logps"})
        cat = lambda xs: torch.cat(xs) if xs and xs[0] is not None else None  # noqa: E731
        merged = PreferenceOutputs(None, cat([p.logps for p in parts]), cat([p.tokens for p in parts]),
                                   cat([p.ref_logps for p in parts]))
        extra = {k: torch.cat([e[k] for e in extras]) for k in (extras[0] if extras else {})}
        return {**self.metrics(merged, extra), "examples": len(data)}

    def metrics(self, out: PreferenceOutputs, extra: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics from per-example [N, S] log-probs, token counts and reference log-probs of a whole split
        (each objective built on this base, dpo/simpo/kto, defines its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define metrics(): the preference base gives only "
                                  "the shared pieces")

    def baseline_metrics(self, train: Any, records: Any) -> dict[str, float]:
        """None: preference optimisation has no model-free reference number here."""
        return {}

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        """Nothing beyond the HF folder, whose tokenizer carries the chat template used in training."""

    def report_samples(self, model: nn.Module, tokenizer: Any) -> list[dict[str, Any]]:
        """Greedy replies to three short held-out prompts, with the chosen (or labelled) response as reference."""
        from tuneforge.generation import GenerationOptions, generate

        if self._samples is None:
            return []
        fits = lambda p: len(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)) \
            <= 2 * self.run.data.max_length  # noqa: E731  (characters: a cheap bound keeping prompts short)
        picked = [p for p in self._samples.items[:20] if fits(p.prompt)][:3]
        replies = generate(model, tokenizer, [p.prompt for p in picked], GenerationOptions(max_new_tokens=96), chat=True)
        return [{"prompt": p.prompt[-1]["content"], "reference": p.chosen, "generation": g}
                for p, g in zip(picked, replies, strict=True)]

    # ----------------------------------------------------------------- after training
    def from_saved(self, model_dir: Path) -> Built:
        """The trained model; with ``needs_reference``, the run's base model as the reference of new files."""
        from tuneforge.models.registry import resolve_model

        built = saved_causal_lm(model_dir)
        self._use_template(built.tokenizer)
        if self.needs_reference and self.reference_model is None:
            from tuneforge.engine.runtime import Runtime

            base = load_causal_lm(self.run, resolve_model(self.run.model.name), packed=False).model
            self.reference_model = Runtime.for_run(self.run.train).move(base).eval()
        return built
