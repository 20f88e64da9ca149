"""Process resources and hardware facts for run reports: memory, CPU model, bf16 support, wall time.

Peak RSS comes from ``getrusage`` (kernel-tracked high-water mark, so short spikes between
samples are not missed), with a psutil fallback where ``resource`` is unavailable (Windows).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Stopwatch", "cpu_info", "current_rss_mb", "peak_rss_mb"]

_MIB = 1024.0 * 1024.0
_CPUINFO = Path("/proc/cpuinfo")
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    try:
        import resource

        maxrss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        if maxrss > 0:
            # Linux reports KiB, macOS bytes.
            return maxrss / _MIB if sys.platform == "darwin" else maxrss / 1024.0
    except (ImportError, OSError, ValueError):
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return float(getattr(info, "peak_wset", info.rss)) / _MIB
    except Exception:
        return current_rss_mb()


def current_rss_mb() -> float:
    """Current resident set size of this process in MiB (0.0 if it cannot be read)."""
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / _MIB
    except Exception:
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / _MIB
    except (OSError, ValueError, IndexError):
        return 0.0


def _read_cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, CPU flags) from /proc/cpuinfo; (None, empty) where it does not exist."""
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, set()
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info() -> dict[str, Any]:
    """{"cpu": model name, "cores": physical cores, "threads": torch threads, "bf16": fast bf16 support}."""
    model, flags = _read_cpuinfo()
    if model is None:
        import platform

        model = platform.processor() or platform.machine() or "unknown"
    cores: int | None
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:
        cores = None
    if not cores:
        cores = os.cpu_count()
    try:
        import torch

        threads: int | None = torch.get_num_threads()
    except Exception:
        threads = None
    return {
        "cpu": model,
        "cores": cores,
        "threads": threads,
        "bf16": sys.platform.startswith("linux") and bool(flags & _BF16_FLAGS),
    }


class Stopwatch:
    """Wall-clock timer on ``time.perf_counter``: ``start()``, then read ``elapsed`` (seconds).

    Starts on construction; ``start()`` restarts it and ``stop()`` freezes ``elapsed``.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._stopped: float | None = None

    def start(self) -> Stopwatch:
        self._start = time.perf_counter()
        self._stopped = None
        return self

    def stop(self) -> float:
        if self._stopped is None:
            self._stopped = time.perf_counter()
        return self.elapsed

    @property
    def elapsed(self) -> float:
        end = self._stopped if self._stopped is not None else time.perf_counter()
        return end - self._start

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
