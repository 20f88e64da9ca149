"""Metrics logging: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard.

The JSONL file is the source of truth (plots and reports are rebuilt from it); TensorBoard is
a convenience and is skipped with a single warning if it cannot be imported. Lines are flushed
as they are written, so a crash loses at most the line being written; ``read_metrics`` skips
such a truncated last line. On resume the file is cut back to the resumed step so the run's
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

__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_tb_warned = False


def _warn_tensorboard(exc: BaseException) -> None:
    global _tb_warned
    if not _tb_warned:
        _tb_warned = True
        warnings.warn(f"TensorBoard logging disabled: {exc}", RuntimeWarning, stacklevel=3)


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


def _as_scalar(value: Any) -> float | None:
    """A float for TensorBoard, or None for non-numeric values (bools and strings included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        try:
            item = value.item()
        except Exception:
            return None
        return _as_scalar(item)
    return None


class MetricsLogger:
    """Appends one JSON object per line to run_dir/metrics.jsonl and mirrors scalars to TensorBoard (run_dir/tensorboard)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.resume_step = resume_step
        self._repair(resume_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self._writer: Any = None
        if tensorboard:
            self._open_tensorboard(resume_step)

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

    def _open_tensorboard(self, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # ImportError, or a broken tensorboard/protobuf install
            _warn_tensorboard(exc)
            return
        kwargs: dict[str, Any] = {}
        if resume_step is not None:
            kwargs["purge_step"] = resume_step + 1
        try:
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), **kwargs)
        except Exception as exc:
            _warn_tensorboard(exc)

    def log(self, step: int, split: str, metrics: dict[str, float], **extra: Any) -> None:
        """Append ``{"step", "split", **metrics, **extra, "time"}``; non-finite floats become null."""
        if self._fh.closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")
        record: dict[str, Any] = {"step": int(step), "split": split, **metrics, **extra, "time": time.time()}
        self._fh.write(_dumps(record) + "\n")
        self._fh.flush()
        if self._writer is not None:
            for name, value in metrics.items():
                scalar = _as_scalar(value)
                if scalar is not None:
                    self._writer.add_scalar(f"{split}/{name}", scalar, global_step=int(step))

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (the JSONL file is flushed on every line)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the JSONL file and the TensorBoard writer; safe to call more than once."""
        if not self._fh.closed:
            self._fh.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _step_of(record: dict[str, Any]) -> float | None:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        return None
    return step
