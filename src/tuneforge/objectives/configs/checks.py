"""Cross-field checks shared by objective configs: refusals by method capability, never by method name."""

from __future__ import annotations

from typing import Any

__all__ = ["refuse_head_only", "refuse_virtual_tokens"]


def refuse_head_only(run: Any, why: str) -> None:
    """Refuse a method that trains only a separate task head (``frozen``): the task has none."""
    if run.method.head_only:
        raise ValueError(f"method.name '{run.method.name}' trains only a task head on cached features, and task "
                         f"'{run.task.name}' {why}; use full, partial or a PEFT method")


def refuse_virtual_tokens(run: Any, why: str) -> None:
    """Refuse a method whose virtual tokens / past key-values are shared by a whole row (prefix, prompt,
    P-tuning v2) where the task cannot give them (``why`` says why)."""
    if run.method.virtual_tokens:
        raise ValueError(f"method.name '{run.method.name}' adds virtual tokens, {why}")
