"""Forgetting report for continual / domain-adaptive pretraining (Gururangan et al. 2020, "Don't Stop
Pretraining"): how the model does on the domain it is adapted to and on general text, before and after.

``task.general_eval: FILE`` (or ``extensions: [{name: forgetting, general_eval: FILE}]``) names a held-out
general-text file (same layout as the training data). The objective's own ``evaluate`` runs on the domain
validation split and on that file once before training (saved in ``forgetting_before.json``, so a resumed
run reuses it) and once after; ``metrics.json`` gets a ``forgetting`` block
``{domain|general: {metric: {before, after, change}}}`` and ``report.md`` a "Forgetting" section. It works
for every objective (each has ``read_split``, ``prepare`` and ``evaluate``). A run extension (see
`extensions.base`): the pipeline does not know it by name.
``general_recipe: RECIPE`` (extension form only) measures general ability with *another* objective: the
recipe's (task, data layout) reads the general file (``general_eval``, else the recipe's ``data.validation``)
and its ``evaluate`` scores the backbone of the model being trained (``base_model_prefix``: the encoder without
the task head, adapters applied). This gives a classifier a general metric that needs no MLM head, e.g. the
STS-B Spearman of its mean-pooled sentence embeddings (`recipes/forgetting-sst2-minilm.yaml`); the block then
names that metric (``general_metric``).
A rising general loss while the domain loss falls is forgetting; both falling means the domain text
also helped general text. When the model has freshly initialized parts (e.g. an MLM head on a checkpoint
shipped without one) the "before" numbers measure that random part and say little; the report notes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError
from tuneforge.extensions.base import Extension, RunContext
from tuneforge.track.atomic import atomic_write_json

__all__ = ["BEFORE_FILE", "Forgetting", "create"]

BEFORE_FILE = "forgetting_before.json"


def create(run: Any, cfg: Any, objective: Any, data: Any, listed: bool) -> Forgetting | None:
    """None without a general file; reads and validates that file (before any model loads)."""
    path, key = (cfg.general_eval, "extensions.forgetting.general_eval") if cfg.general_eval is not None else \
        (run.task.general_eval, "task.general_eval")
    general_run = general_objective = None
    if cfg.general_recipe is not None:
        general_run, general_objective = _general_task(Path(cfg.general_recipe))
        if path is None:
            path, key = general_run.data.validation, "extensions.forgetting.general_recipe"
    if path is None:
        if listed:
            raise ConfigError("the forgetting report needs a general-text file", key="extensions.forgetting.general_eval")
        return None
    if not Path(path).exists():
        raise ConfigError(f"file not found: {path}", key=key)
    reader = general_objective or objective
    return Forgetting(run, objective, data, reader.read_split(Path(path)), Path(path),
                      general_run=general_run, general_objective=general_objective)


def _general_task(recipe: Path) -> tuple[Any, Any]:
    """(run config, objective) of the general recipe, which must name a file to score."""
    from tuneforge.config import load_config
    from tuneforge.objectives import get_objective

    key = "extensions.forgetting.general_recipe"
    if not recipe.is_file():
        raise ConfigError(f"file not found: {recipe}", key=key)
    try:
        general = load_config(str(recipe), [])
    except ConfigError as e:
        raise ConfigError(f"general recipe {recipe}: {e}", key=key) from None
    return general, get_objective(general)


def backbone(model: Any) -> Any:
    """The model without its task head: ``base_model_prefix``'s module of the (peft-unwrapped) model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, getattr(inner, "base_model_prefix", ""), inner)


class Forgetting(Extension):
    """Before/after evaluation on the domain validation split and on the general file."""

    def __init__(self, run: Any, objective: Any, data: Any, general: Any, path: Path, fresh_parts: bool = False,
                 general_run: Any = None, general_objective: Any = None):
        self.run, self.objective, self.data, self.general, self.path = run, objective, data, general, path
        self.fresh_parts = fresh_parts
        self.general_run, self.general_objective = general_run or run, general_objective

    def _measure(self, ctx: RunContext) -> dict[str, dict[str, float]]:
        batch_size = self.run.train.eval_batch_size or 2 * self.run.train.batch_size
        out = {}
        other = self.general_objective
        for name, records in (("domain", self.data.splits["validation"]), ("general", self.general)):
            objective, run, model = (other, self.general_run, backbone(ctx.model)) if name == "general" and other \
                else (self.objective, self.run, ctx.model)
            batches = objective.prepare(records, ctx.built.tokenizer, run)
            m = objective.evaluate(model, batches, batch_size=batch_size, runtime=ctx.runtime)
            out[name] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return out

    def on_build(self, ctx: RunContext) -> None:
        self.fresh_parts = bool(ctx.built.newly_initialized)

    def on_train_start(self, ctx: RunContext) -> None:
        """Measure the starting model once (a resumed run keeps the first measurement)."""
        if not (ctx.run_dir / BEFORE_FILE).is_file():
            atomic_write_json(ctx.run_dir / BEFORE_FILE, self._measure(ctx))

    def on_end(self, ctx: RunContext) -> dict[str, Any]:
        """The ``forgetting`` block: per text, per metric, before / after / change."""
        before = json.loads((ctx.run_dir / BEFORE_FILE).read_text(encoding="utf-8"))
        after = self._measure(ctx)
        block: dict[str, Any] = {"general_eval": str(self.path)}
        if self.general_objective is not None:
            block["general_task"] = self.general_objective.name
            block["general_metric"] = self.general_objective.default_metric
        for name, metrics in after.items():
            block[name] = {k: {"before": before[name].get(k), "after": v,
                               "change": v - before[name][k] if k in before[name] else None}
                           for k, v in metrics.items()}
        if self.fresh_parts:
            block["note"] = "parts of the model were newly initialized, so 'before' measures them at random init"
        return block

    @staticmethod
    def markdown(block: dict[str, Any]) -> str:
        """The report section: one row per text and metric."""
        how = f" scored by the '{block['general_task']}' objective on the backbone" if block.get("general_task") else ""
        lines = ["## Forgetting", "", f"Domain = the validation split; general = `{block['general_eval']}`{how}.", "",
                 "| text | metric | before | after | change |", "|---|---|---|---|---|"]
        for name in ("domain", "general"):
            for metric, v in block[name].items():
                cells = [_fmt(v["before"]), _fmt(v["after"]), _fmt(v["change"], signed=True)]
                lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
        if block.get("note"):
            lines += ["", f"Note: {block['note']}."]
        return "\n".join(lines) + "\n"

    def report_section(self, block: dict[str, Any] | None) -> str | None:
        return self.markdown(block) if block else None


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if float(value).is_integer():  # counts (tokens scored), or a change of exactly zero
        return f"{int(value):+,}" if signed else f"{int(value):,}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
