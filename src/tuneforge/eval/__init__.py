"""Task metrics (thin wrappers over scikit-learn and friends) and evaluation helpers."""

from __future__ import annotations

from typing import Any

__all__ = ["flatten_metrics"]


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars only; nested per-class (classification) and per-type (NER) figures become ``f1/<label>``;
    matrices and label lists are left out."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or k in ("confusion_matrix", "labels"):
            continue
        if isinstance(v, (int, float)):
            flat[k] = float(v)
        elif k in ("per_class", "per_type") and isinstance(v, dict):
            for label, stats in v.items():
                for name, value in stats.items():
                    if name != "support":
                        flat[f"{name}/{label}"] = float(value)
    return flat
