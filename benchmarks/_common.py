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


# ----------------------------------------------------------------------------- device
def add_device_arg(parser) -> None:
    """``--device auto|cpu|cuda``: auto picks CUDA when present (the issue: run on CUDA where there is one)."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where every run trains/infers (default: cuda when present, else cpu)")


def pick_device(requested: str) -> str:
    """``auto`` resolved to ``cuda`` or ``cpu``; ``cuda`` without a CUDA device exits with a clear message."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return requested


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock reading after it covers the work (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def device_peak_mib(device: str) -> float | None:
    """Peak GPU memory allocated by torch in this process (MiB), None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name()


def describe_device(device: str) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: what the benchmarks print at the start."""
    return device if device == "cpu" else f"{device} ({gpu_name(device)})"


def results_path(path: Path, device: str) -> Path:
    """``results/x.json`` for CPU runs, ``results/x-cuda.json`` for GPU runs (so neither overwrites the other)."""
    return path if device == "cpu" else path.with_name(f"{path.stem}-{device.split(':')[0]}{path.suffix}")


def fmt_mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


@contextmanager
def profiled(out_dir: str | None, name: str, device: str, active: int = 20, skip: int = 8) -> Iterator:
    """With ``out_dir`` set (``--profile DIR``), profile ``active`` optimizer steps after ``skip`` warm-up steps
    with torch.profiler (the body calls the yielded ``tick()`` once per optimizer step) and write
    ``DIR/profile-<name>.txt``: aten ops, kernel launches and device kernels per step, then the op tables by self
    host time and, on CUDA, by self device time. The profiler slows the run: read it for where time goes, not for
    speed. Without ``out_dir`` ``tick`` does nothing."""
    if not out_dir:
        yield lambda: None
        return
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    marks: list[float] = []

    def tick() -> None:
        if len(marks) in (skip, skip + active):
            synchronize(device)
            marks.append(time.perf_counter())
        elif len(marks) < skip + active:
            marks.append(0.0)
        prof.step()

    with profile(activities=acts, schedule=schedule(wait=skip - 2, warmup=2, active=active, repeat=1)) as prof:
        yield tick
    if len(marks) <= skip + active:
        raise SystemExit(f"--profile needs more than {skip + active} optimizer steps (got {len(marks)})")
    ms = 1000 * (marks[skip + active] - marks[skip]) / active
    table = prof.key_averages()
    launches = sum(e.count for e in table if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    ops = sum(e.count for e in table if e.key.startswith("aten::"))
    lines = [f"# {name} on {device}: {active} optimizer steps profiled after {skip}, {ms:.1f} ms/step under the "
             f"profiler; per step: {ops / active:.0f} aten ops, {launches / active:.0f} kernel launches, "
             f"{kernels / active:.0f} device kernels/copies", "",
             table.table(sort_by="self_cpu_time_total", row_limit=45)]
    if cuda:
        lines += ["", table.table(sort_by="self_device_time_total", row_limit=30)]
    path = Path(out_dir) / f"profile-{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
