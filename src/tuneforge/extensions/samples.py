"""Before/after generation samples for generative objectives (a run extension, see `extensions.base`).

The objective (``spec.generative``) picks a few held-out prompts and generates greedily
(`GenerativeObjective.report_samples`); this extension asks it once on the base model, before the method
wraps it, and once after training, and puts both side by side in report.md's "Samples" section.
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import ConfigError
from tuneforge.extensions.base import Extension, RunContext
from tuneforge.track.report import rows_section

__all__ = ["Samples", "create"]


def create(run: Any, cfg: Any, objective: Any, data: Any, listed: bool) -> Samples | None:
    if not objective.spec.generative:
        if listed:
            raise ConfigError(f"task '{run.task.name}' does not generate text; samples need a generative task",
                              key="extensions.samples")
        return None
    return Samples() if cfg.enabled else None


class Samples(Extension):
    """Greedy generations for a few held-out prompts, before and after training."""

    def __init__(self) -> None:
        self.before: list[dict[str, Any]] = []

    def on_build(self, ctx: RunContext) -> None:
        self.before = ctx.objective.report_samples(ctx.built.model, ctx.built.tokenizer)

    def on_end(self, ctx: RunContext) -> dict[str, Any] | None:
        after = ctx.objective.report_samples(ctx.model, ctx.built.tokenizer)
        rows = [{**{k: v for k, v in b.items() if k != "generation"}, "before": b["generation"], "after": a["generation"]}
                for b, a in zip(self.before, after, strict=False)]
        return {"rows": rows} if rows else None

    def report_section(self, block: dict[str, Any] | None) -> str | None:
        return rows_section("Samples", block["rows"]) if block else None
