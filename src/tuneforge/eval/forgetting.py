"""Forgetting report for continual / domain-adaptive pretraining (Gururangan et al. 2020, "Don't Stop
Pretraining"): how the model does on the domain it is adapted to and on general text, before and after.

``task.general_eval: FILE`` names a held-out general-text file (same layout as the training data). The
objective's own ``evaluate`` runs on the domain validation split and on that file once before training
(saved in ``forgetting_before.json``, so a resumed run reuses it) and once after; ``metrics.json`` gets
a ``forgetting`` block ``{domain|general: {metric: {before, after, change}}}`` and ``report.md`` a
"Forgetting" section. It works for every objective that has ``read_split``, ``prepare`` and ``evaluate``.
A rising general loss while the domain loss falls is forgetting; both falling means the domain text
also helped general text. When the model has freshly initialized parts (e.g. an MLM head on a checkpoint
shipped without one) the "before" numbers measure that random part and say little; the report notes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import ConfigError
from tuneforge.track.atomic import atomic_write_json, atomic_write_text
from tuneforge.track.report import REPORT_FILE

__all__ = ["BEFORE_FILE", "Forgetting"]

BEFORE_FILE = "forgetting_before.json"


class Forgetting:
    """Before/after evaluation on the domain validation split and on ``task.general_eval``."""

    def __init__(self, run: Any, objective: Any, data: Any, general: Any, fresh_parts: bool = False):
        self.run, self.objective, self.data, self.general = run, objective, data, general
        self.fresh_parts = fresh_parts

    @classmethod
    def create(cls, run: Any, objective: Any, data: Any) -> Forgetting | None:
        """None without ``task.general_eval``; reads and validates that file (before any model loads)."""
        path = getattr(run.task, "general_eval", None)
        if path is None:
            return None
        if not hasattr(objective, "read_split"):
            raise ConfigError(f"task '{run.task.name}' cannot read an extra evaluation file", key="task.general_eval")
        if not Path(path).exists():
            raise ConfigError(f"file not found: {path}", key="task.general_eval")
        return cls(run, objective, data, objective.read_split(Path(path)))

    def _measure(self, model: Any, tokenizer: Any, autocast: Callable[[], Any]) -> dict[str, dict[str, float]]:
        batch_size = self.run.train.eval_batch_size or 2 * self.run.train.batch_size
        out = {}
        for name, records in (("domain", self.data.splits["validation"]), ("general", self.general)):
            batches = self.objective.prepare(records, tokenizer, self.run)
            with torch.inference_mode():
                m = self.objective.evaluate(model, batches, batch_size=batch_size, autocast=autocast)
            out[name] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return out

    def before(self, run_dir: Path, model: Any, tokenizer: Any, autocast: Callable[[], Any]) -> None:
        """Measure the starting model once (a resumed run keeps the first measurement)."""
        if not (Path(run_dir) / BEFORE_FILE).is_file():
            atomic_write_json(Path(run_dir) / BEFORE_FILE, self._measure(model, tokenizer, autocast))

    def after(self, run_dir: Path, model: Any, tokenizer: Any, autocast: Callable[[], Any]) -> dict[str, Any]:
        """The ``forgetting`` block: per text, per metric, before / after / change."""
        before = json.loads((Path(run_dir) / BEFORE_FILE).read_text(encoding="utf-8"))
        after = self._measure(model, tokenizer, autocast)
        block: dict[str, Any] = {"general_eval": str(self.run.task.general_eval)}
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

    def write_report_section(self, run_dir: Path, block: dict[str, Any]) -> None:
        """Insert the section into ``report.md`` after the final metrics (before plots/config)."""
        path = Path(run_dir) / REPORT_FILE
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        section = self.markdown(block) + "\n"
        for anchor in ("## Plots", "## Samples", "## Notes", "## Hardware", "## Resolved config"):
            at = text.find("\n" + anchor + "\n")
            if at >= 0:
                atomic_write_text(path, text[: at + 1] + section + text[at + 1 :])
                return
        atomic_write_text(path, text.rstrip("\n") + "\n\n" + section)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if float(value).is_integer():  # counts (tokens scored), or a change of exactly zero
        return f"{int(value):+,}" if signed else f"{int(value):,}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
