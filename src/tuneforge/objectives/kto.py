"""KTO (``task: kto``; Ethayarajh et al. 2024): alignment from unpaired completions labelled desirable or not.

With r = log pi(y|x) - log ref(y|x) (summed over response tokens) and z a batch estimate of KL(pi || ref),
a desirable example loses ``lambda_D (1 - sigmoid(beta (r - z)))``, an undesirable one ``lambda_U (1 -
sigmoid(beta (z - r)))`` (`preference_losses.kto_loss`; ``task.beta`` 0.1, ``task.desirable_weight`` /
``task.undesirable_weight``). z is estimated, as in the paper and TRL, from *mismatched* pairs: each example's
prompt with another example's completion (here the next one in the split, fixed when the data is encoded),
z = mean(log pi - log ref) over the batch's mismatched pairs, detached and clamped at 0. The mismatched
sequences travel in the same batch (the ``kl`` side) and go through the policy without gradients; the
reference log-probs of both sides are precomputed with the base model (see `preference_lm`).

Metrics over a split: ``loss`` (with z estimated over the whole split), ``kl`` (that z), ``reward_accuracy``
(the implicit reward ``beta r`` falls on its label's side of 0; a tie counts half, so the untrained
policy scores 0.5), ``desirable_reward`` / ``undesirable_reward`` (mean implicit rewards) and their
difference ``reward_margin``.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.data.pairs import PairBatches
from tuneforge.data.preference import Preference, Preferences
from tuneforge.objectives.configs.dpo import KtoConfig
from tuneforge.objectives.preference_lm import PreferenceLMObjective, PreferenceOutputs, response_logps
from tuneforge.objectives.preference_losses import kto_loss, pairwise_accuracy

__all__ = ["KtoConfig", "KtoObjective", "mismatched"]


def mismatched(records: Preferences) -> Preferences:
    """``records`` as pairs (completion, the next example's completion): the second side estimates the KL."""
    n = len(records)
    items = [Preference(p.prompt, p.chosen, records.items[(i + 1) % n].chosen, p.line, label=p.label)
             for i, p in enumerate(records.items)]
    return Preferences(items, records.source, True, records.skipped, records.split, records.malformed)


class KtoObjective(PreferenceLMObjective):
    """Implements the `Objective` protocol for KTO."""

    name = "kto"
    paired = False

    @property
    def sides(self) -> tuple[str, ...]:
        return ("chosen", "kl")

    def encode(self, records: Preferences, tokenizer: Any) -> PairBatches:
        if (hit := self._encoded.get(id(records))) is not None and hit[0] is records:
            return hit[1]
        data = super().encode(mismatched(records), tokenizer)  # pairs (completion, KL completion)
        data.columns = {k.replace("rejected_", "kl_"): v for k, v in data.columns.items()}
        data.sides = self.sides
        labels = torch.tensor([p.label for p in records.items], dtype=torch.bool)
        data.extra["desirable"] = labels[torch.as_tensor(data.extra.pop("_keep"), dtype=torch.long)]
        self._encoded[id(records)] = (records, data)
        return data

    def _extra(self, records: Preferences, keep: list[int]) -> dict[str, torch.Tensor]:
        return {"_keep": torch.as_tensor(keep, dtype=torch.long)}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PreferenceOutputs:
        """Policy log-probs of the completions (with gradients) and of the mismatched pairs (without)."""
        b = batch["input_ids"].shape[0] // 2
        own = {k: batch[k][:b] for k in ("input_ids", "attention_mask", "labels")}
        other = {k: batch[k][b:] for k in ("input_ids", "attention_mask", "labels")}
        head = self.fused_head(model)
        scored, logps, tokens = response_logps(model, own, head)
        with torch.no_grad():
            _, kl_logps, kl_tokens = response_logps(model, other, head)
        ref = None
        if "ref_logps" in batch:
            ref = batch["ref_logps"].T.reshape(-1).to(logps.dtype)  # [B, 2] -> [2B], own completions first
        elif self.reference is not None:
            with torch.no_grad(), self.reference() as ref_model:
                ref = response_logps(ref_model, batch, self.fused_head(ref_model))[1].detach()
        return PreferenceOutputs(scored, torch.cat([logps, kl_logps.detach()]), torch.cat([tokens, kl_tokens]), ref)

    def _losses(self, logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-example losses, the KL estimate z) from [2B] (training) or [N, 2] (evaluation) log-probs."""
        t = self.run.task
        own, kl_side = logps.reshape(2, -1) if logps.dim() == 1 else logps.T
        ref_own, ref_kl = ref.reshape(2, -1) if ref.dim() == 1 else ref.T
        z = (kl_side - ref_kl).mean().detach().clamp(min=0)
        losses = kto_loss(own, ref_own, desirable, z, beta=t.beta, desirable_weight=t.desirable_weight,
                          undesirable_weight=t.undesirable_weight)
        return losses, z

    def loss(self, outputs: PreferenceOutputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if outputs.ref_logps is None:
            raise ValueError("kto needs reference log-probs")
        return self._losses(outputs.logps, outputs.ref_logps, batch["desirable"])[0].mean()

    def metrics(self, out: PreferenceOutputs, extra: dict[str, torch.Tensor]) -> dict[str, float]:
        desirable = extra["desirable"]
        losses, z = self._losses(out.logps, out.ref_logps, desirable)
        rewards = self.run.task.beta * (out.logps[:, 0] - out.ref_logps[:, 0])
        signed = torch.where(desirable, rewards, -rewards)
        good = float(rewards[desirable].mean()) if desirable.any() else float("nan")
        bad = float(rewards[~desirable].mean()) if (~desirable).any() else float("nan")
        return {"loss": float(losses.mean()), "kl": float(z),
                "reward_accuracy": pairwise_accuracy(signed, torch.zeros_like(signed)),
                "desirable_reward": good, "undesirable_reward": bad, "reward_margin": good - bad}


OBJECTIVE = KtoObjective
