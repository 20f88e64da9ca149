"""What the benchmark scripts share (run as ``python benchmarks/<script>.py``, so this folder is importable)."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def cpu_util(cpu_s: float, wall_s: float) -> float:
    """Process CPU time (every thread) / (wall time x torch threads): near 1 when a block kept every core busy,
    lower when other load shared the cores (or the block waited on something single-threaded)."""
    import torch

    return cpu_s / (wall_s * torch.get_num_threads())


@contextmanager
def cpu_clock() -> Iterator[dict]:
    """Yields a dict that gets the block's ``wall_s``, ``cpu_s`` and `cpu_util`."""
    out: dict = {}
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall_s"], out["cpu_s"] = time.perf_counter() - w0, time.process_time() - c0
        out["cpu_util"] = cpu_util(out["cpu_s"], out["wall_s"])


def warn_if_shared(utils: dict[str, float], floor: float = 0.85) -> None:
    """Print a warning naming the runs whose CPU utilisation was below ``floor``."""
    low = {k: v for k, v in utils.items() if v < floor}
    if low:
        runs = ", ".join(f"{k} ({100 * v:.0f}%)" for k, v in low.items())
        print(f"WARNING: cpu util below {100 * floor:.0f}% in {runs}: other load shared the cores, or the run "
              "waited on single-threaded work; timings may be off")
