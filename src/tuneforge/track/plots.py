"""PNG plots of a run, rebuilt from ``metrics.jsonl``: loss, learning rate and eval metrics.

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly rather than ``pyplot``, so it
never changes the global backend or figure registry of the calling process (safe in tests,
notebooks and worker threads). Odd data (missing keys, None/NaN, strings) is skipped point by
point; a plot with nothing to show is not written.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuneforge.track.atomic import atomic_write_bytes
from tuneforge.track.logger import read_metrics

__all__ = ["PLOTS_DIR", "write_plots"]

PLOTS_DIR = "plots"

# Keys that describe a record rather than measure the model; never plotted as eval metrics.
_BOOKKEEPING_KEYS = frozenset({"step", "split", "time", "epoch", "loss", "lr"})

Series = tuple[list[float], list[float]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Iterable[dict[str, Any]], split: str, key: str) -> Series:
    """(steps, values) of ``key`` in records of ``split``, sorted by step, bad points dropped."""
    points: list[tuple[float, float]] = []
    for record in records:
        if record.get("split") != split:
            continue
        step, value = _number(record.get("step")), _number(record.get(key))
        if step is not None and value is not None:
            points.append((step, value))
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def _eval_metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for record in records:
        if record.get("split") != "eval":
            continue
        for key, value in record.items():
            if key in _BOOKKEEPING_KEYS or "/" in key or key.startswith("confusion"):
                continue
            if _number(value) is not None:
                names.setdefault(key, None)
    return list(names)


def _render(
    path: Path,
    title: str,
    ylabel: str,
    lines: list[tuple[str, Series, dict[str, Any]]],
) -> bool:
    """Draw ``lines`` (label, series, plot kwargs) and write a PNG atomically; False if no data."""
    lines = [line for line in lines if line[1][0]]
    if not lines:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (xs, ys), style in lines:
        ax.plot(xs, ys, label=label, **style)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1 or lines[0][0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _point_style(series: Series) -> dict[str, Any]:
    """Markers for sparse series (eval points), plain lines for dense ones."""
    return {"marker": "o", "markersize": 4} if len(series[0]) <= 50 else {}


def write_plots(run_dir: Path) -> list[Path]:
    """Write plots/loss.png, plots/lr.png and plots/eval_metrics.png where there is data; return them."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = run_dir / PLOTS_DIR
    written: list[Path] = []

    train_loss = _series(records, "train", "loss")
    eval_loss = _series(records, "eval", "loss")
    loss_lines: list[tuple[str, Series, dict[str, Any]]] = [
        ("train", train_loss, {"linewidth": 1.0}),
        ("eval", eval_loss, _point_style(eval_loss)),
    ]
    if _render(out_dir / "loss.png", "Loss", "loss", loss_lines):
        written.append(out_dir / "loss.png")

    lr = _series(records, "train", "lr")
    if _render(out_dir / "lr.png", "Learning rate", "lr", [("", lr, {"linewidth": 1.0})]):
        written.append(out_dir / "lr.png")

    eval_lines = []
    for name in _eval_metric_names(records):
        series = _series(records, "eval", name)
        eval_lines.append((name, series, _point_style(series)))
    if _render(out_dir / "eval_metrics.png", "Eval metrics", "value", eval_lines):
        written.append(out_dir / "eval_metrics.png")
    return written
