"""Mixed precision on CPU: bf16 autocast where the hardware has it, fp32 master weights always.

On CPUs with AVX-512 BF16 or AMX, bf16 matmuls run about twice as fast as fp32; autocast keeps weights,
gradients and optimizer state in fp32 and runs matmuls in bf16, so accuracy matches fp32 training while
the heavy work is halved. Elsewhere ``auto`` falls back to fp32 (bf16 emulation would be slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import lru_cache

import torch

__all__ = ["autocast_factory", "cpu_has_bf16", "resolve_precision"]


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists native bf16 instructions (avx512_bf16 or amx_bf16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> str:
    """Map ``auto|bf16|fp32`` to the precision actually used on this machine."""
    if requested == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return requested


def autocast_factory(precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the autocast context for ``precision`` (``bf16`` or ``fp32``)."""
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext
