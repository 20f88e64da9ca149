"""User-facing errors: each names what is wrong and where, and maps to a process exit code.

The CLI catches `TuneforgeError` and prints its message without a traceback. Exit codes:
2 for bad input (config, data, usage), 3 for a training failure (e.g. non-finite loss under the
``stop`` policy), 130 when interrupted.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "DataError", "TrainingError", "TuneforgeError"]


class TuneforgeError(Exception):
    """Base class of every error tuneforge reports to a user."""

    exit_code = 2


class ConfigError(TuneforgeError):
    """A recipe or override is invalid: names the key and, where known, the allowed values."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"config error at '{key}': {message}" if key else f"config error: {message}")


class DataError(TuneforgeError):
    """An input file is malformed: names the file and, where known, the 1-based line."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"data error: {where}{message}")


class TrainingError(TuneforgeError):
    """Training could not go on (e.g. non-finite loss under the 'stop' policy)."""

    exit_code = 3
