"""Metrics logging: one JSON object per line in ``metrics.jsonl``, mirrored to the run's trackers.

The JSONL file is the source of truth (plots and reports are rebuilt from it); the trackers
(TensorBoard by default, MLflow, W&B: ``train.report_to``, see `tuneforge.track.trackers`) are
mirrors. Lines are flushed as they are written, so a crash loses at most the line being written;
``read_metrics`` skips such a truncated last line. On resume the file is cut back to the resumed step so the run's
history has no duplicated or "ghost" records from steps that were later recomputed.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from tuneforge.track.atomic import atomic_write_text, to_jsonable
from tuneforge.track.trackers import Trackers

__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False)


def _parse_lines(text: str, path: Path) -> list[dict[str, Any]]:
    """Parse JSONL text; a bad last line (crash mid-write) is skipped silently, others with a warning."""
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index != len(lines) - 1:
                warnings.warn(f"{path}:{index + 1}: skipping unparseable metrics line", stacklevel=3)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Return every record of ``run_dir/metrics.jsonl`` in file order ([] if there is none)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return _parse_lines(text, path)


class MetricsLogger:
    """Appends one JSON object per line to run_dir/metrics.jsonl and mirrors the scalars to ``trackers``.

    ``trackers``: a started `Trackers` session owned by the caller (the pipeline, which finishes it once the
    report exists); on an exception leaving the ``with`` block it is closed as failed (killed on Ctrl-C).
    Without one, ``tensorboard=True`` mirrors to run_dir/tensorboard through a session this logger owns.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None,
                 trackers: Trackers | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.resume_step = resume_step
        self._repair(resume_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self._owned = trackers is None
        if trackers is None:
            trackers = Trackers(["tensorboard"] if tensorboard else []).start(self.run_dir, resume_step=resume_step)
        self.trackers = trackers

    def _repair(self, resume_step: int | None) -> None:
        """Drop records after ``resume_step`` and any truncated trailing line, atomically."""
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if resume_step is None and (not raw or raw.endswith(b"\n")):
            return  # nothing to cut: keep appending to the file as it is
        records = _parse_lines(raw.decode("utf-8", errors="replace"), self.path)
        if resume_step is not None:
            records = [r for r in records if _step_of(r) is not None and _step_of(r) <= resume_step]
        atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in records))

    def log(self, step: int, split: str, metrics: dict[str, float], **extra: Any) -> None:
        """Append ``{"step", "split", **metrics, **extra, "time"}``; non-finite floats become null."""
        if self._fh.closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")
        record: dict[str, Any] = {"step": int(step), "split": split, **metrics, **extra, "time": time.time()}
        self._fh.write(_dumps(record) + "\n")
        self._fh.flush()
        self.trackers.log(int(step), split, metrics)

    def flush(self) -> None:
        """Push buffered tracker events (TensorBoard's) to disk (the JSONL file is flushed on every line)."""
        self.trackers.flush()

    def close(self, status: str = "finished") -> None:
        """Close the JSONL file; close the trackers if this logger owns them or the run ended otherwise than
        ``finished`` (a caller's session is otherwise only flushed: it is finished once the report exists)."""
        if not self._fh.closed:
            self._fh.close()
        if self._owned or status != "finished":
            self.trackers.close(status)
        else:
            self.trackers.flush()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close("killed" if issubclass(exc_type, KeyboardInterrupt) else "failed")


def _step_of(record: dict[str, Any]) -> float | None:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        return None
    return step
