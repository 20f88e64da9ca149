"""`Runtime`: where and how a run computes, made once per run and passed wherever work is done.

One object answers the questions every piece of the engine would otherwise answer for itself (litgpt's
``Fabric(devices, precision)``, nanochat's ``compute_init`` are the models): which device
(``train.device``: ``auto`` takes the best present, CUDA then MPS then CPU), which precision
(``train.precision``: ``auto`` is bf16 autocast on CUDA devices with bf16 and on CPUs where bf16 matmuls
are measured faster than fp32 ones, fp16 autocast with a gradient scaler on older GPUs, fp32 elsewhere;
weights always stay fp32), and
this process's rank, local rank and world size (read from the launcher's environment: ``torchrun``,
``accelerate launch``; see `engine.distributed`, which also joins the process group, gloo on CPUs and
nccl on GPUs, and picks the GPU of the local rank). It moves models and batches, wraps the training
module for data parallelism (``train.distributed``: DDP, or FSDP2 in `engine.fsdp`), opens the autocast and inference contexts, and
carries the RNG state of every generator in use (Python, torch CPU, CUDA) for exact resume.

Why bf16 autocast and fp32 master weights: on Ampere+ GPUs and on CPUs with AMX, bf16 matmuls run several
times as fast as fp32 while weights, gradients and optimizer state keep fp32, so accuracy matches fp32
training. fp16 has a narrower range, hence the gradient scaler.

Why ``auto`` measures on a CPU instead of reading the flags: the bf16 instructions alone do not make bf16
faster. On a Xeon with AMX a 2048^3 bf16 matmul ran at 2,419 GFLOP/s against 374 in fp32 (6.5x); on a Xeon
exposing AVX512-BF16 but not AMX, 167 against 324 (0.5x: autocast there only adds casts and halves
the matmuls). So `cpu_bf16_speedup` times one transformer-sized bf16 and fp32 matmul once per process (~60
ms), and ``auto`` takes bf16 only where it is at least `BF16_MIN_SPEEDUP` times faster; the margin keeps the
choice away from the noise of a machine where the two are close. Under a launcher rank 0's choice is
broadcast so every rank autocasts alike. ``train.precision=bf16`` / ``fp32`` skip the measurement.

Why cuDNN attention is switched off on CUDA: on Hopper, torch 2.11 sends bf16/fp16 SDPA with a padding mask to
cuDNN, which builds an execution graph for every new sequence length. Length-grouped, dynamically padded
batches bring a new length at nearly every step, and each attention call then spent 7-9 ms on the host
(``_cudnn_attention_forward`` / ``_backward`` in torch.profiler): MiniLM bf16 training on an H100 ran 89 ms per
step against 18 ms in fp32, and the HF Trainer's ``bf16=True`` was slowed alike (torchtune#1652 reports the same
overhead). Without it SDPA takes FlashAttention or the memory-efficient kernel, which need no per-shape build.
The flag is process-wide (``torch.backends.cuda.enable_cudnn_sdp``), set when a CUDA runtime is made.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from tuneforge.engine import distributed as dist_
from tuneforge.engine.allocator import tune_cpu_allocator
from tuneforge.errors import ConfigError

__all__ = ["BF16_MIN_SPEEDUP", "Runtime", "available_devices", "cpu_bf16_speedup", "cpu_has_bf16", "resolve_device",
           "resolve_precision"]

BF16_MIN_SPEEDUP = 1.25  # auto takes bf16 on a CPU only when its matmuls are at least this much faster


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists native bf16 instructions (avx512_bf16 or amx_bf16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a [256, 1024] x [1024, 1024] linear on this CPU with the current threads (best
    of 5 each after a warm-up; 0.0 without native bf16 instructions, where bf16 is emulated). Measured once
    per process (see module docstring)."""
    if not cpu_has_bf16():
        return 0.0
    best = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)  # not the global generator: a run's random stream stays as seeded
            x, w = (torch.randn(n, 1024, generator=gen).to(dtype) for n in (256, 1024))
            torch.nn.functional.linear(x, w)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                times.append(time.perf_counter() - t0)
            best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def _mps_available() -> bool:
    backend = torch.backends.mps if hasattr(torch.backends, "mps") else None
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """The devices this machine offers, best first (``cuda:0`` ..., ``mps``, ``cpu``)."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(requested: str = "auto") -> torch.device:
    """``train.device`` -> a present `torch.device`; a device that is not there is a `ConfigError`."""
    present = available_devices()
    if requested == "auto":
        return torch.device(present[0])
    wanted = torch.device(requested)
    ok = (wanted.type == "cpu" or (wanted.type == "mps" and "mps" in present)
          or (wanted.type == "cuda" and f"cuda:{wanted.index or 0}" in present))
    if not ok:
        raise ConfigError(f"device '{requested}' is not available on this machine; present: {', '.join(present)}",
                          key="train.device")
    if wanted.type == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", torch.cuda.current_device())
    return wanted


def _cuda_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> str:
    """``train.precision`` on ``device`` -> ``bf16``, ``fp16`` or ``fp32`` (see module docstring)."""
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_bf16(device) else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast needs a GPU; on a CPU use bf16 or fp32", key="train.precision")
    return requested


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _distributed_mode(requested: str, world_size: int) -> str:
    """``train.distributed`` under a launcher of ``world_size`` > 1 processes -> ``ddp`` or ``fsdp``."""
    if requested in ("auto", "ddp"):
        return "ddp"
    if requested in ("fsdp", "deepspeed"):
        return requested
    raise ConfigError(f"train.distributed=none but the launcher started {world_size} processes; each would train "
                      "alone into the same output_dir. Use ddp (or auto), or start one process",
                      key="train.distributed")


def _rank_device(requested: str, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is asked for (or ``auto`` finds it), else the CPU."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                              "start at most that many processes per node", key="train.device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if requested.startswith("cuda:") or requested == "mps":
        raise ConfigError(f"train.device={requested} names one device, but {requested} cannot be shared by every "
                          "rank; use auto, cuda (one GPU per local rank) or cpu", key="train.device")
    if requested == "cuda":
        raise ConfigError("train.device=cuda but no GPU is present", key="train.device")
    return torch.device("cpu")


def _tune_host(device: torch.device, wanted: bool) -> None:
    """Process-wide settings for the run's device: `engine.allocator`'s malloc settings on a CPU (``wanted``:
    ``train.tune_allocator``); on CUDA, scaled-dot-product attention without the cuDNN backend (see the module
    docstring)."""
    if wanted and device.type == "cpu":
        tune_cpu_allocator()
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


@dataclass
class Runtime:
    """Device, precision and process placement of one run (see module docstring)."""

    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: str = "none"  # how the training module is wrapped: none | ddp | fsdp | deepspeed
    backend: str = ""  # the process group's backend (gloo, nccl) when world_size > 1

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", distributed: str = "auto", *,
               tune_allocator: bool = True) -> Runtime:
        """From ``train.device`` / ``train.precision`` / ``train.distributed`` values and the launcher's
        environment; errors name those keys. Under a launcher (``WORLD_SIZE`` > 1) this joins the process group.
        On a CPU, ``tune_allocator`` (``train.tune_allocator``) applies `engine.allocator`'s malloc settings."""
        place = dist_.env_placement()
        if place.world_size == 1:
            dev = resolve_device(device)
            _tune_host(dev, tune_allocator)
            return cls(device=dev, precision=resolve_precision(precision, dev))
        mode = _distributed_mode(distributed, place.world_size)
        dev = _rank_device(device, place.local_rank)
        _tune_host(dev, tune_allocator)
        if mode == "deepspeed":  # a missing package is a config error before the process group starts
            from tuneforge.engine.deepspeed_zero import import_deepspeed

            import_deepspeed(dev)
        backend = dist_.init_from_env(place, dev)
        chosen = resolve_precision(precision, dev)
        if precision == "auto" and dev.type == "cpu":  # a measured choice: every rank takes rank 0's
            chosen = dist_.broadcast_object(chosen)
        return cls(device=dev, precision=chosen, rank=place.rank,
                   local_rank=place.local_rank, world_size=place.world_size, distributed=mode, backend=backend)

    @classmethod
    def for_run(cls, train_cfg: Any) -> Runtime:
        """The runtime a run's ``train`` block asks for."""
        return cls.create(train_cfg.device, train_cfg.precision, getattr(train_cfg, "distributed", "auto"),
                          tune_allocator=train_cfg.tune_allocator)

    @classmethod
    def cpu(cls, precision: str = "fp32") -> Runtime:
        """A CPU runtime (tests, and tools that must not touch an accelerator)."""
        return cls(device=torch.device("cpu"), precision=precision)

    # ------------------------------------------------------------------ placement
    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of this run (a no-op in fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """``no_grad`` + autocast: what every evaluation and prediction runs under.

        Not ``inference_mode``: under it autocast does not cache its casts of the weights, so every batch
        cast every fp32 weight to bf16 again (21% of a MiniLM prediction's time, `aten::copy_`). Under
        ``no_grad`` the cast of each trainable weight is made once for the whole context (autocast caches
        casts of leaf tensors that require grad) and reused by every batch; the numbers are the same.
        """
        with torch.no_grad(), self.autocast():
            yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (None otherwise: bf16 and fp32 need none)."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def move(self, model: nn.Module) -> nn.Module:
        """``model`` on this runtime's device (in place for modules; returns it)."""
        return model.to(self.device)

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A batch dict with its tensors on the device (non-blocking copies from pinned CPU memory on CUDA)."""
        if self.device.type == "cpu":
            return dict(batch)
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that runs forward in training: under DDP, ``model`` wrapped (gradients averaged over
        ranks); under FSDP, ``model`` itself sharded in place (`engine.fsdp`); in one process, ``model``. Under
        DeepSpeed ``model`` too: the engine needs the optimizer and is made with it (`engine.deepspeed_zero`)."""
        if self.distributed == "ddp":
            return dist_.wrap_ddp(model, self.device)
        if self.distributed == "fsdp":
            from tuneforge.engine.fsdp import shard_model

            return shard_model(model)
        return model

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        """The model inside what `wrap` returned."""
        return dist_.unwrap(module)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.world_size > 1:
            dist_.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks of a few numbers (the values themselves in one process)."""
        return dist_.all_reduce_sum(values) if self.world_size > 1 else [float(v) for v in values]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return dist_.broadcast_object(obj) if self.world_size > 1 else obj

    def describe(self) -> str:
        where = f"{self.device} ({self.precision})"
        if self.world_size > 1:
            where += f", rank {self.rank} of {self.world_size} ({self.distributed}, {self.backend})"
        return where

    # ------------------------------------------------------------------ RNG
    def rng_state(self) -> dict[str, Any]:
        """Every RNG a run draws from: Python, torch CPU and, when present, each CUDA device."""
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def set_rng_state(state: Mapping[str, Any]) -> None:
        """Restore `rng_state`; CUDA states are restored only where CUDA is present (a GPU checkpoint
        resumes on a CPU with the CPU generators exact; a CPU checkpoint on a GPU seeds CUDA as it was)."""
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

