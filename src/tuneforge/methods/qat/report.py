"""The ``qat`` block of a QAT run: the validation metrics of the same trained weights three ways.

* ``fp32``: the master weights with fake quantisation switched off (what plain fine-tuning would deploy);
* ``fake_quant``: the model as trained (the run's headline ``splits.validation`` numbers are these);
* ``converted``: torchao's converted model with real int weights and int8 dynamic activations, the model
  the run saves and that ``tuneforge eval`` / ``predict`` load;

plus the serialised size of the model before and after conversion (``torch.save`` of the state dict: int
weights with their scales against fp32; under LoRA, of the merged model). A run extension offered every run
(``auto``) that applies only to method=qat and to lora with ``method.qat``, so the pipeline knows neither by name; ``report.md`` gets a "Quantization-aware training" section.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import torch

from tuneforge.errors import ConfigError
from tuneforge.extensions.base import Extension, RunContext
from tuneforge.methods.qat.config import qat_options
from tuneforge.objectives.base import final_evaluation

__all__ = ["QatReport", "create", "state_bytes"]


def create(run: Any, cfg: Any, objective: Any, data: Any, listed: bool) -> QatReport | None:
    if qat_options(run.method) is None:
        if listed:
            raise ConfigError("the qat report compares fp32, fake-quantised and converted models of a QAT run: "
                              "it needs method=qat or method.qat under lora", key="extensions")
        return None
    return QatReport(run, objective, data)


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the serialised size (tied weights counted once)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class QatReport(Extension):
    """fp32 vs fake-quant vs converted on the validation split, after training."""

    def __init__(self, run: Any, objective: Any, data: Any):
        self.run, self.objective, self.data = run, objective, data

    def on_end(self, ctx: RunContext) -> dict[str, Any]:
        from tuneforge.methods.qat import apply as qat

        cfg, model = qat_options(self.run.method), ctx.model
        batch_size = self.run.train.eval_batch_size or 2 * self.run.train.batch_size
        batches = self.objective.prepare(self.data.splits["validation"], ctx.built.tokenizer, self.run)

        def measure(m: torch.nn.Module) -> dict[str, float]:
            return _numbers(final_evaluation(self.objective, m, batches, batch_size=batch_size, runtime=ctx.runtime))

        if hasattr(model, "merge_and_unload"):  # QAT under LoRA: merged (fp32 master + LoRA), then converted
            with torch.no_grad():
                merged = copy.deepcopy(model).merge_and_unload()
        else:
            merged = model
        with qat.fake_quant(model, enabled=False):
            fp32 = measure(model)
        with qat.fake_quant(merged, enabled=False):
            fp32_bytes = state_bytes(merged)
        converted = qat.convert(merged, cfg)
        return {
            "weight_bits": cfg.weight_bits, "activation_bits": 8, "group_size": cfg.group_size,
            "validation": {"fp32": fp32, "fake_quant": measure(model), "converted": measure(converted)},
            "bytes": {"fp32": fp32_bytes, "converted": state_bytes(converted)},
        }

    def report_section(self, block: dict[str, Any] | None) -> str | None:
        if not block:
            return None
        v = block["validation"]
        lines = ["## Quantization-aware training", "",
                 f"int8 dynamic activations, int{block['weight_bits']} weights (group size {block['group_size']}); "
                 f"serialised size {block['bytes']['fp32'] / 2**20:,.1f} MiB fp32 -> "
                 f"{block['bytes']['converted'] / 2**20:,.1f} MiB converted.", "",
                 "| metric | fp32 weights | fake-quant (trained) | converted (saved) |", "|---|---|---|---|"]
        for k in v["fake_quant"]:
            cells = [f"{v[s].get(k, float('nan')):.4f}" for s in ("fp32", "fake_quant", "converted")]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
