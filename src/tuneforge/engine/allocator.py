"""Host memory allocator settings for CPU runs (``train.tune_allocator``): keep freed buffers for reuse.

Why: glibc's ``malloc`` serves large requests (above a threshold that starts at 128 KiB and grows only as
far as the largest buffer freed so far) with a fresh ``mmap`` and returns them to the kernel on ``free``;
it also trims the top of its heap back to the kernel once more than twice that threshold lies free. A
training step allocates and frees the same large buffers every step (logits, their fp32 copy, the
softmax gradient, activation casts), so each step pays the kernel to zero and map those pages again: in a
tiny GPT-2 step the ``fill_`` of a [1016, 4000] gradient took 11 ms for 16 MB, most of it page faults.
Fixing the mmap threshold at glibc's maximum (32 MiB) and raising the trim threshold keeps those buffers
in the heap, where the next step reuses them: 1.3x tokens/s on ``benchmarks/bench_pretrain.py``
(2 cores, the same gain for the HF Trainer when its process gets the same settings, see
benchmarks/README.md). Intel's PyTorch CPU tuning guide recommends the same (or jemalloc/tcmalloc via
``LD_PRELOAD``, which a library cannot do for its own process once started).

What it costs: memory a run freed stays with the process (its RSS stays at the run's high-water mark
rather than shrinking between steps); peak RSS is unchanged in the benchmarks. The settings are
process-wide and stay for the life of the process. ``mallopt`` is glibc's; on other C libraries (musl,
macOS) this does nothing. Results are unchanged: only where buffers come from changes.
"""

from __future__ import annotations

import ctypes
import platform
from functools import lru_cache

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap before trimming


@lru_cache(maxsize=1)
def tune_cpu_allocator() -> bool:
    """Apply the settings above once per process; True when they took effect (glibc), False otherwise."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
