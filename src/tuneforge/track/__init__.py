"""Run tracking: atomic artefact writes, metrics logging, plots, reports and resource usage.

Everything a run leaves on disk goes through this package so that files are crash-safe
(written atomically) and the run's history can be rebuilt from ``metrics.jsonl`` alone.
"""

from __future__ import annotations

from tuneforge.track.atomic import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    to_jsonable,
)
from tuneforge.track.logger import METRICS_FILE, MetricsLogger, read_metrics
from tuneforge.track.plots import write_plots
from tuneforge.track.report import REPORT_FILE, render_report, write_report
from tuneforge.track.resources import Stopwatch, cpu_info, current_rss_mb, peak_rss_mb

__all__ = [
    "METRICS_FILE",
    "REPORT_FILE",
    "MetricsLogger",
    "Stopwatch",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_yaml",
    "cpu_info",
    "current_rss_mb",
    "peak_rss_mb",
    "read_metrics",
    "render_report",
    "to_jsonable",
    "write_plots",
    "write_report",
]
