"""Forgetting report for continual / domain-adaptive pretraining (Gururangan et al. 2020, "Don't Stop
Pretraining"): how the model does on the domain it is adapted to and on general text, before and after.

``task.general_eval: FILE`` (or ``extensions: [{name: forgetting, general_eval: FILE}]``) names a held-out
general-text file (same layout as the training data). The objective's own ``evaluate`` runs on the domain
validation split and on that file once before training (saved in ``forgetting_before.json``, so a resumed
run reuses it) and once after; ``metrics.json`` gets a ``forgetting`` block
``{domain|general: {metric: {before, after, change}}}`` and ``report.md`` a "Forgetting" section. It works
for every objective (each has ``read_split``, ``prepare`` and ``evaluate``). A run extension (see
`extensions.base`): the pipeline does not know it by name.
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
    if path is None:
        if listed:
            raise ConfigError("the forgetting report needs a general-text file", key="extensions.forgetting.general_eval")
        return None
    if not Path(path).exists():
        raise ConfigError(f"file not found: {path}", key=key)
    return Forgetting(run, objective, data, objective.read_split(Path(path)), Path(path))


class Forgetting(Extension):
    """Before/after evaluation on the domain validation split and on the general file."""

    def __init__(self, run: Any, objective: Any, data: Any, general: Any, path: Path, fresh_parts: bool = False):
        self.run, self.objective, self.data, self.general, self.path = run, objective, data, general, path
        self.fresh_parts = fresh_parts

    def _measure(self, ctx: RunContext) -> dict[str, dict[str, float]]:
        batch_size = self.run.train.eval_batch_size or 2 * self.run.train.batch_size
        out = {}
        for name, records in (("domain", self.data.splits["validation"]), ("general", self.general)):
            batches = self.objective.prepare(records, ctx.built.tokenizer, self.run)
            m = self.objective.evaluate(ctx.model, batches, batch_size=batch_size, runtime=ctx.runtime)
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
        lines = ["## Forgetting", "", f"Domain = the validation split; general = `{block['general_eval']}`.", "",
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
