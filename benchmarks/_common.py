"""What the benchmark scripts share (run as ``python benchmarks/<script>.py``, so this folder is importable)."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` (``ru_maxrss`` of a child process can start from
    its parent's peak, e.g. when the parent trained a model first)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
