"""What the causal-LM objectives (``clm``, ``sft``) share: loading, the loss, evaluation and checks.

Both train ``AutoModelForCausalLM`` on rows of ``input_ids`` / ``labels`` (``-100`` = no loss), optionally
packed with ``position_ids`` (see `data.packing`). The loss is the mean next-token NLL over the
supervised tokens of a micro-batch; evaluation sums NLL and token counts over the whole split, so its
``loss`` (and ``perplexity = exp(loss)``) is token-weighted and independent of batching and packing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.data.batching import Batches
from tuneforge.errors import ConfigError
from tuneforge.eval.lm import IGNORE_INDEX, perplexity
from tuneforge.objectives.base import Built, TokenLogits, eval_batches
from tuneforge.objectives.chunked_ce import FusedHeads, per_token_nll_head

if TYPE_CHECKING:
    from tuneforge.engine.runtime import Runtime

__all__ = [
    "CausalLMObjective",
    "TokenNLL",
    "check_decoder",
    "check_packed_attention",
    "evaluate_lm",
    "forward_nll",
    "lm_forward",
    "lm_loss",
    "load_causal_lm",
    "saved_causal_lm",
    "supervised_positions_only",
]


def check_decoder(run: RunConfig) -> Path:
    """The model folder, after checking it is a decoder (read from config.json, no weights loaded)."""
    from tuneforge.models.registry import model_family, resolve_model

    path = resolve_model(run.model.name)
    family = model_family(path)
    if family != "decoder":
        raise ConfigError(f"task '{run.task.name}' trains a causal language model; '{run.model.name}' is an "
                          f"{family} model (use a decoder such as smollm2-135m, tiny-llama or tiny-gpt2)", key="model")
    return path


def load_causal_lm(run: RunConfig, model_path: Path, *, packed: bool) -> Built:
    """``AutoModelForCausalLM`` + tokenizer (pad = EOS when the tokenizer has no pad token), fp32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, info = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=run.model.attn_implementation, output_loading_info=True,
    )
    if packed:
        check_packed_attention(model, run.model.name)
    return Built(model, tokenizer, sorted(info.get("missing_keys", [])))


def saved_causal_lm(model_dir: Path) -> Built:
    """A trained (or any) causal-LM folder, whatever method wrote it (see `methods.saved`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.methods.saved import load_trained

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_trained(AutoModelForCausalLM, model_dir, dtype=torch.float32)
    return Built(model.eval(), tokenizer)


@torch.no_grad()
def check_packed_attention(model: nn.Module, name: str) -> None:
    """Refuse document packing when ``model`` lets a packed document attend to the one before it.

    transformers isolates packed sequences from restarting ``position_ids`` for architectures built on
    ``masking_utils.create_causal_mask``; older modelling code ignores them. Six tokens decide it.
    """
    was_training = model.training
    model.eval()
    emb = model.get_input_embeddings()
    ids = torch.arange(1, 7, device=emb.weight.device).remainder(emb.num_embeddings)[None]
    with torch.autocast(ids.device.type, enabled=False):  # fp32: bf16 noise would blur the comparison
        # [-3:]: methods that prepend virtual tokens (prompt tuning) return logits for those too
        alone = model(input_ids=ids[:, 3:], use_cache=False).logits[:, -3:]
        positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=ids.device)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, -3:]
    model.train(was_training)
    # Kernels differ between the two calls (~1e-5 relative); a leak changes logits by O(their scale).
    scale = float(alone.abs().max())
    if float((alone - packed).abs().max()) > 1e-3 * scale + 1e-5:
        raise ConfigError(f"model '{name}' ({type(model).__name__}) does not keep packed documents apart through "
                          "position_ids; use task.packing=blocks or none", key="task.packing")


@dataclass
class TokenNLL:
    """`lm_forward`'s outputs when the output layer and the loss ran fused (`chunked_ce`): the per-token
    ``nll`` [N] (fp32) of the ``targets`` [N]. ``logits`` [N, V] are computed from the kept output-layer
    inputs only if something asks for them (distillation)."""

    nll: torch.Tensor
    targets: torch.Tensor
    hidden: torch.Tensor
    head: nn.Module

    @cached_property
    def logits(self) -> torch.Tensor:  # once per batch however often it is read (distillation reads it twice)
        return self.head(self.hidden)


def lm_forward(model: nn.Module, batch: dict[str, torch.Tensor], *,
               fused_head: nn.Linear | None = None) -> TokenLogits | TokenNLL:
    """Next-token logits at the positions whose next token is supervised, with those tokens as targets.

    Packed rows carry ``position_ids`` and no attention mask, which is what makes transformers build a
    per-document causal mask; ``use_cache=False`` is required for that detection (and saves memory).

    When only some tokens are supervised (SFT's response-only loss, padding), the output layer runs on the
    hidden states of those positions only (`supervised_positions_only`): the vocabulary projection, the fp32
    logits and the softmax are the largest per-token cost of a small LM with a big vocabulary (SmolLM2:
    576 x 49,152), and their values at unsupervised positions are never used. The result is the same
    number as projecting every position (a test checks loss and gradients).

    With ``fused_head`` (the model's frozen output layer, `chunked_ce.fusable_head`), that layer returns the
    per-token NLL straight away and no [N, V] logits are kept (`TokenNLL`).
    """
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    elif "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    labels = batch["labels"]
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    if fused_head is not None:
        kept: list[torch.Tensor] = []
        goal = targets[scored]
        with supervised_positions_only(fused_head, scored, keep=kept), per_token_nll_head(fused_head, goal):
            nll = model(**inputs, use_cache=False).logits
        return TokenNLL(nll, goal, kept[0], fused_head)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    every = bool(scored.all())
    if head is not None and not every:
        with supervised_positions_only(head, scored):
            logits = model(**inputs, use_cache=False).logits
        if logits.dim() == 2:  # the hook ran: one row of logits per scored position
            return TokenLogits(logits, targets[scored])
    else:
        logits = model(**inputs, use_cache=False).logits
    # prompt tuning prepends virtual tokens: their logits come first and have no labels
    logits = logits[:, logits.shape[1] - labels.shape[1] :][:, :-1]
    if every:  # a view, no copy of the [B, T, V] logits
        return TokenLogits(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return TokenLogits(logits[scored], targets[scored])


def token_nll(outputs: TokenLogits | TokenNLL) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL, scored tokens) of `lm_forward`'s outputs."""
    if isinstance(outputs, TokenNLL):
        total = outputs.nll.sum()
    else:
        total = F.cross_entropy(outputs.logits.float(), outputs.targets, reduction="sum")
    return total, torch.tensor(outputs.targets.numel(), device=outputs.targets.device)


def forward_nll(model: nn.Module, batch: dict[str, torch.Tensor], *,
                fused_head: nn.Linear | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL, scored tokens) of one batch (see `lm_forward`)."""
    return token_nll(lm_forward(model, batch, fused_head=fused_head))


@contextmanager
def supervised_positions_only(head: nn.Module, scored: torch.Tensor, keep: list[torch.Tensor] | None = None):
    """While active, ``head`` (the output layer) sees only the hidden states that predict a scored token.

    ``scored`` is [B, T-1]: position ``t`` predicts token ``t + 1``. Virtual tokens that a method prepends
    (prompt tuning) come first in the hidden states and are skipped. The output is then [N, vocab] logits,
    N = ``scored.sum()``, in the order of ``targets[scored]``; ``keep`` (a list) receives those hidden states.
    """

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.dim() != 3:
            return args
        hidden = hidden[:, hidden.shape[1] - scored.shape[1] - 1 : -1][scored]
        if keep is not None:
            keep.append(hidden)
        return (hidden, *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over the supervised tokens of ``batch`` (0 when it has none)."""
    total, count = forward_nll(model, batch)
    return total / count.clamp(min=1)


def evaluate_lm(model: nn.Module, data: Batches, *, batch_size: int, runtime: Runtime,
                fused_head: nn.Linear | None = None) -> dict[str, Any]:
    """Token-weighted ``loss`` (mean NLL), ``perplexity`` and the number of scored ``tokens``."""
    total, count = 0.0, 0
    for _, batch in eval_batches(model, data, batch_size, runtime):
        nll, n = forward_nll(model, batch, fused_head=fused_head)
        total, count = total + float(nll), count + int(n)
    if count == 0:
        raise ConfigError("the evaluation data has no tokens to score (all empty or cut off by data.max_length)")
    mean = total / count
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}


class CausalLMObjective:
    """What the `Objective` implementations ``clm`` and ``sft`` share: an ``AutoModelForCausalLM`` whose LM
    head is pretrained, the loss (checking on the first packed batch that the model, as the method wrapped
    it, keeps packed documents apart), token-weighted evaluation, and scoring of base models."""

    name = ""
    default_metric = "loss"
    greater_is_better = False

    def __init__(self, run: RunConfig):
        self.run = run
        self.notes: list[str] = []
        self._packing_checked = False
        self.fused_head = FusedHeads(run.train.chunked_cross_entropy)  # model -> its fused output layer or None

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLogits | TokenNLL:
        if "position_ids" in batch and not self._packing_checked:  # the model as the method wrapped it
            check_packed_attention(model, self.run.model.name)
            self._packing_checked = True
        return lm_forward(model, batch, fused_head=self.fused_head(model))

    def loss(self, outputs: TokenLogits | TokenNLL, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL over the supervised tokens (0 when the batch has none)."""
        total, count = token_nll(outputs)
        return total / count.clamp(min=1)

    def evaluate(self, model: nn.Module, data: Batches, *, batch_size: int, runtime: Runtime) -> dict[str, Any]:
        head = self.fused_head(model, needs_grad=False)  # no gradient here: even a trained output layer qualifies
        return evaluate_lm(model, data, batch_size=batch_size, runtime=runtime, fused_head=head)

    def baseline_metrics(self, train: Any, records: Any) -> dict[str, float]:
        """None: a language model has no model-free reference number here."""
        return {}
