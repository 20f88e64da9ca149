"""Human-readable ``report.md`` for a finished (or interrupted) run.

Collects what a reader wants on one page: the command, headline numbers (wall time, memory,
throughput, parameter counts), final metrics per split as Markdown tables (per-class metrics
and confusion matrices as their own tables), hardware, links to the plots, free-form sample
rows and notes, and the fully resolved config so the run can be reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tuneforge.track.atomic import atomic_write_text, to_yamlable

__all__ = ["REPORT_FILE", "rows_section", "write_report"]

REPORT_FILE = "report.md"
_PLOT_ORDER = ("loss.png", "lr.png", "eval_metrics.png")
_MAX_CELL = 200
_KNOWN_KEYS = frozenset(
    {
        "title", "command", "config", "final_metrics", "throughput", "peak_rss_mb", "wall_time_s",
        "trainable_params", "total_params", "hardware", "notes", "samples", "sections",
    }
)  # fmt: skip


def _fmt(value: Any) -> str:
    """Format one value for a table cell: floats to 4 decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (Mapping, list, tuple)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _cell(value: Any) -> str:
    text = _fmt(value).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def _table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _fenced(text: str, lang: str) -> list[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    return [f"{fence}{lang}", text.rstrip("\n"), fence, ""]


def _duration(seconds: float) -> str:
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _is_matrix(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(row, (list, tuple)) for row in value)
    )


def _confusion(title: str, matrix: Sequence[Sequence[Any]], labels: Any) -> list[str]:
    width = max(len(row) for row in matrix)
    names = list(labels) if isinstance(labels, (list, tuple)) else []
    if len(names) < max(width, len(matrix)):
        names = [str(i) for i in range(max(width, len(matrix)))]
    headers = ["true \\ pred", *names[:width]]
    rows = [[names[i], *row] for i, row in enumerate(matrix)]
    return [f"#### {title}", "", *_table(headers, rows)]


def _nested(title: str, value: Mapping[str, Any]) -> list[str]:
    """A per-class style table: rows are the outer keys, columns the union of inner keys."""
    if all(isinstance(v, Mapping) for v in value.values()):
        columns: dict[str, None] = {}
        for inner in value.values():
            columns.update(dict.fromkeys(str(k) for k in inner))
        rows = [[name, *(inner.get(c) for c in columns)] for name, inner in value.items()]
        return [f"#### {title}", "", *_table(["", *columns], rows)]
    return [f"#### {title}", "", *_table(["key", "value"], list(value.items()))]


def _split_section(split: str, metrics: Any) -> list[str]:
    lines = [f"### {split}", ""]
    if not isinstance(metrics, Mapping):
        return [*lines, _fmt(metrics), ""]
    confusion = metrics.get("confusion_matrix")
    scalars: list[tuple[str, Any]] = []
    extra: list[str] = []
    for key, value in metrics.items():
        if key == "confusion_matrix":
            if isinstance(value, Mapping) and _is_matrix(value.get("matrix")):
                extra += _confusion("confusion matrix", value["matrix"], value.get("labels"))
            elif _is_matrix(value):
                extra += _confusion("confusion matrix", value, metrics.get("labels"))
            else:
                scalars.append((key, value))
        elif key == "labels" and _is_matrix(confusion):
            continue  # shown as the confusion matrix's row/column names
        elif isinstance(value, Mapping) and value:
            extra += _nested(key, value)
        elif _is_matrix(value):
            extra += [f"#### {key}", "", *_table([str(i) for i in range(len(value[0]))], value)]
        else:
            scalars.append((key, value))
    if scalars:
        lines += _table(["metric", "value"], scalars)
    return lines + extra


def _summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    wall = summary.get("wall_time_s")
    if isinstance(wall, (int, float)) and not isinstance(wall, bool) and math.isfinite(wall):
        rows.append(("wall time", f"{wall:.1f} s ({_duration(wall)})"))
    rss = summary.get("peak_rss_mb")
    if isinstance(rss, (int, float)) and not isinstance(rss, bool):
        rows.append(("peak RSS", f"{rss:.1f} MiB"))
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if isinstance(trainable, int):
        share = f" ({100.0 * trainable / total:.2f}% of total)" if isinstance(total, int) and total else ""
        rows.append(("trainable params", f"{trainable:,}{share}"))
    if isinstance(total, int):
        rows.append(("total params", f"{total:,}"))
    throughput = summary.get("throughput")
    if isinstance(throughput, Mapping):
        rows += [(str(k), v) for k, v in throughput.items()]
    return rows


def _plot_links(run_dir: Path) -> list[str]:
    plots_dir = run_dir / "plots"
    if not plots_dir.is_dir():
        return []
    found = sorted(p.name for p in plots_dir.glob("*.png") if p.is_file())
    ordered = [n for n in _PLOT_ORDER if n in found] + [n for n in found if n not in _PLOT_ORDER]
    return [line for n in ordered for line in (f"![{Path(n).stem}](plots/{n})", "")]


def rows_section(title: str, rows: Sequence[Any]) -> str:
    """A ``## title`` section with one table row per mapping in ``rows`` (columns: the union of keys)."""
    rows_ = [r if isinstance(r, Mapping) else {"value": r} for r in rows]
    columns = list(dict.fromkeys(str(k) for row in rows_ for k in row))
    return "\n".join([f"## {title}", "", *_table(columns, [[row.get(c) for c in columns] for row in rows_])])


def render_report(run_dir: Path, summary: Mapping[str, Any]) -> str:
    """The Markdown text of the report (``write_report`` writes it)."""
    run_dir = Path(run_dir)
    lines = [f"# {summary.get('title') or run_dir.name}", ""]
    if summary.get("command"):
        lines += ["## Command", "", *_fenced(str(summary["command"]), "bash")]
    rows = _summary_rows(summary)
    if rows:
        lines += ["## Summary", "", *_table(["", "value"], rows)]
    final = summary.get("final_metrics")
    if isinstance(final, Mapping) and final:
        lines += ["## Final metrics", ""]
        for split, metrics in final.items():
            lines += _split_section(str(split), metrics)
    plots = _plot_links(run_dir)
    if plots:
        lines += ["## Plots", "", *plots]
    samples = summary.get("samples")
    if isinstance(samples, Sequence) and not isinstance(samples, str) and samples:
        lines += [*rows_section("Samples", samples).splitlines(), ""]
    for section in summary.get("sections") or ():  # extensions' own sections, already Markdown
        lines += [*section.rstrip("\n").splitlines(), ""]
    notes = summary.get("notes")
    if notes:
        items = [notes] if isinstance(notes, str) else list(notes)
        lines += ["## Notes", "", *(f"- {note}" for note in items), ""]
    hardware = summary.get("hardware")
    if isinstance(hardware, Mapping) and hardware:
        lines += ["## Hardware", "", *_table(["", "value"], list(hardware.items()))]
    other = [(k, v) for k, v in summary.items() if k not in _KNOWN_KEYS]
    if other:
        lines += ["## Other", "", *_table(["key", "value"], other)]
    config = summary.get("config")
    if config:
        text = yaml.safe_dump(to_yamlable(config), sort_keys=False, allow_unicode=True)
        lines += ["## Resolved config", "", *_fenced(text, "yaml")]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``run_dir/report.md`` atomically and return its path."""
    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render_report(run_dir, summary))
    return path
