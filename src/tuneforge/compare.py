"""`tuneforge compare`: one task, one data set, one seed and step budget, several fine-tuning methods.

Each method is trained by ``python -m tuneforge train RECIPE k=v... method=<m> output_dir=<out>/<m>`` in a
fresh child process, so its peak memory is its own: the kernel's high-water mark of the child's resident
set, read with ``os.wait4`` (``ru_maxrss``), which misses no short spike. Each method runs with its own
default learning rate unless ``train.lr`` is given (then all share it). After training, this process
measures what the run directory does not record:

* trainable parameters, final metric (the task's default, on validation) and train throughput: from the
  run's ``metrics.json``, i.e. the counts of the model training used (wired by `tuneforge.wiring`);
* saved size: bytes of the weight files in ``<run>/model`` (what a user ships for this method);
* inference latency: median over repeats of one forward pass on the first 32 validation rows (padded as
  the pipeline pads), under the run's precision, of the base model (pretrained weights, fresh head, no
  method), the trained model unmerged and, where the method merges, merged. The models are timed in
  turn within each repeat (base, unmerged, merged, base, ...), so a slow spell of the machine hits all of
  them alike and ``merged / base`` compares like with like.

Outputs (written atomically into the output directory): ``compare.md`` (table + command), ``compare.csv``
(one row per method, numeric columns; empty cells where not applicable) and ``compare.png``.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, load_config
from tuneforge.errors import ConfigError
from tuneforge.track.atomic import atomic_write_bytes, atomic_write_text
from tuneforge.track.rundir import model_folder

__all__ = ["CompareResult", "MethodResult", "compare", "default_compare_dir", "split_overrides"]

LATENCY_BATCH = 32


@dataclass
class MethodResult:
    """One row of the comparison (None where not measured)."""

    method: str
    lr: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    metric: float | None = None
    train_samples_per_s: float | None = None
    train_seconds: float | None = None
    peak_rss_mb: float | None = None
    saved_bytes: int | None = None
    base_latency_ms: float | None = None
    latency_ms: float | None = None
    merged_latency_ms: float | None = None
    merged_note: str = ""
    error: str = ""


@dataclass
class CompareResult:
    output_dir: Path
    rows: list[MethodResult]

    @property
    def failed(self) -> list[MethodResult]:
        return [r for r in self.rows if r.error]


def default_compare_dir() -> Path:
    return Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"


def split_overrides(overrides: list[str]) -> tuple[list[str], Path | None, list[str]]:
    """(methods, output_dir, the overrides passed to every run) from ``methods=a,b output_dir=D k=v...``."""
    methods: list[str] = []
    out: Path | None = None
    rest: list[str] = []
    for text in overrides:
        key, _, value = text.partition("=")
        key = key.strip()
        if key == "methods":
            methods = [m.strip() for m in value.split(",") if m.strip()]
        elif key == "output_dir":
            out = Path(value)
        elif key == "method" or key.startswith("method."):
            raise ConfigError("compare runs every method with its own defaults; give the methods as "
                              "methods=a,b,c (method options cannot be set here)", key=key)
        else:
            rest.append(text)
    return methods, out, rest


def _check_methods(methods: list[str]) -> None:
    from tuneforge.methods import METHODS

    registered = ", ".join(sorted(METHODS))
    if not methods:
        raise ConfigError(f"name the methods to compare, e.g. methods=full,lora; registered: {registered}",
                          key="methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; registered: {registered}", key="methods")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"a method is listed twice in {','.join(methods)}", key="methods")


def compare(recipe: str | Path | None, overrides: list[str], methods: list[str], output_dir: Path | None = None,
            *, overwrite: bool = False, quiet: bool = False, command: str = "", repeats: int = 15) -> CompareResult:
    """Train ``methods`` on the same recipe and write compare.md/csv/png into the output dir.

    Configuration errors of any method (e.g. bitfit on a bias-free model) are raised before anything
    trains; a method whose training fails is recorded as failed and the others still run.
    """
    _check_methods(methods)
    out = Path(output_dir) if output_dir is not None else default_compare_dir()
    runs = {m: load_config(recipe, [*overrides, f"method={m}", f"output_dir={out / m}"]) for m in methods}
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; use --overwrite to replace it", key="output_dir")
        import shutil

        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for i, m in enumerate(methods, 1):
        _say(quiet, f"[{i}/{len(methods)}] {m}: training (log: {out / 'logs' / (m + '.log')})")
        row = _run_method(recipe, overrides, m, runs[m], out, repeats)
        _say(quiet, f"    {m}: " + (f"failed: {row.error}" if row.error else
                                      f"{_metric_name(runs[m])}={_fmt(row.metric)}, "
                                      f"{_fmt(row.trainable_pct)}% trainable, peak {_fmt(row.peak_rss_mb)} MiB"))
        results.append(row)
    first = runs[methods[0]]
    _write_outputs(out, results, _metric_name(first), first, command, repeats)
    return CompareResult(out, results)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def _metric_name(run: RunConfig) -> str:
    from tuneforge.objectives import get_objective

    return run.train.metric or get_objective(run).default_metric


# --------------------------------------------------------------------------- one method
def _train_child(recipe: str | Path | None, overrides: list[str], method: str, out: Path) -> tuple[int, float | None]:
    """Run the training in a child process; returns (exit code, its peak RSS in MiB or None)."""
    argv = [sys.executable, "-m", "tuneforge", "train", *([str(recipe)] if recipe else []), *overrides,
            f"method={method}", f"output_dir={out / method}", "--quiet"]
    with (out / "logs" / f"{method}.log").open("wb") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if not hasattr(os, "wait4"):
                return proc.wait(), None
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: do not leave the child training on its own
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        # Linux reports KiB, macOS bytes
        return proc.returncode, usage.ru_maxrss / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _run_method(recipe, overrides: list[str], method: str, run: RunConfig, out: Path, repeats: int) -> MethodResult:
    import json

    from tuneforge.methods.saved import weights_bytes

    row = MethodResult(method, lr=run.lr)
    code, row.peak_rss_mb = _train_child(recipe, overrides, method, out)
    run_dir = out / method
    if code != 0:
        row.error = f"exit {code}: {_last_error(out / 'logs' / f'{method}.log')}"
        return row
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    row.metric = metrics.get("eval", {}).get(_metric_name(run))
    row.train_samples_per_s = metrics["train"].get("train_samples_per_s")
    row.train_seconds = metrics["train"].get("train_seconds")
    row.trainable_params, row.total_params = metrics["train"]["trainable_params"], metrics["train"]["total_params"]
    row.trainable_pct = 100.0 * row.trainable_params / row.total_params
    row.saved_bytes = weights_bytes(model_folder(run_dir))
    try:
        _measure_model(row, run, run_dir, repeats)
    except Exception as e:  # keep the other methods' hours of training; the row says what went wrong
        row.error = f"measuring the trained model failed: {type(e).__name__}: {e}"
    return row


def _measure_model(row: MethodResult, run: RunConfig, run_dir: Path, repeats: int) -> None:
    """Latencies of the base model (built and seeded as the pipeline builds it, no method), the trained
    model and, where the method merges, the merged one; on the run's device and precision."""
    import torch
    from transformers import set_seed

    from tuneforge.engine import Runtime
    from tuneforge.methods import get_method
    from tuneforge.models.scratch import model_source
    from tuneforge.objectives import get_objective

    runtime = Runtime.for_run(run.train)
    objective = get_objective(run)
    path, _ = model_source(run)
    data = objective.load_data(run)
    method = get_method(run.method.name).runtime()
    saved = objective.from_saved(model_folder(run_dir))
    batches = objective.prepare(data.splits["validation"], saved.tokenizer, run)
    batch = runtime.to_device(batches.collate(list(range(min(LATENCY_BATCH, len(batches))))))
    batch.pop("labels", None)
    set_seed(run.train.seed)
    models = [objective.build(run, path, data).model, saved.model]
    if method.merge is not None:
        models.append(method.merge(objective.from_saved(model_folder(run_dir)).model))
    elif method.merge_unsupported is not None:
        row.merged_note = f"n/a ({method.merge_unsupported})"
    else:
        row.merged_note = "n/a (saved as plain transformers weights: nothing to merge)"
    times = _latencies([runtime.move(m) for m in models], batch, runtime, repeats)
    row.base_latency_ms, row.latency_ms = times[0], times[1]
    if len(times) > 2:
        row.merged_latency_ms = times[2]
    del models
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _latencies(models: list, batch: dict, runtime: Any, repeats: int) -> list[float]:
    """Median milliseconds of one forward pass on ``batch`` for each model (after 2 warm-up passes each),
    the models timed in turn within every repeat."""

    times: list[list[float]] = [[] for _ in models]
    for m in models:
        m.eval()
    with runtime.inference():
        for i in range(repeats + 2):
            for m, t in zip(models, times, strict=True):
                _sync(runtime)
                t0 = time.perf_counter()
                m(**batch)
                _sync(runtime)
                if i >= 2:
                    t.append(1000.0 * (time.perf_counter() - t0))
    return [statistics.median(t) for t in times]


def _sync(runtime: Any) -> None:
    """Wait for queued GPU work, so a timer measures the forward pass and not its launch."""
    import torch

    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


# --------------------------------------------------------------------------- outputs
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _markdown(results: list[MethodResult], metric: str, run: RunConfig, command: str, repeats: int) -> str:
    from tuneforge.engine import Runtime

    budget = f"{run.train.max_steps} steps" if run.train.max_steps else f"{run.train.epochs:g} epoch(s)"
    lines = [
        f"# tuneforge compare: {run.task.name} on {run.model.name}", "",
        "```bash", command or "tuneforge compare ...", "```", "",
        f"Same data, seed ({run.train.seed}), batch size ({run.train.batch_size}) and budget ({budget}) for every "
        "method, each trained in its own process (peak RSS is that process's). Metric: "
        f"{metric} on validation. Latency: median of {repeats} forward passes on one batch of {LATENCY_BATCH} "
        f"validation rows, on {Runtime.for_run(run.train).describe()}, {_threads()} torch thread(s); the base "
        "model (pretrained, no method) is timed in turn with each method's models, and merged / base is their "
        "ratio.", "",
        f"| method | lr | trainable params | trainable % | {metric} | train samples/s | peak RSS (MiB) "
        "| saved size | base latency (ms) | latency (ms) | merged latency (ms) | merged / base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in results:
        if r.error:
            lines.append(f"| {r.method} | {r.lr:g} | failed: see below | | | | {_fmt(r.peak_rss_mb, 0)} | | | | | |")
            notes.append(f"- **{r.method}** failed: {r.error}")
            continue
        merged = _fmt(r.merged_latency_ms, 1) if r.merged_latency_ms is not None else "n/a ¹" if r.merged_note else "n/a"
        if r.merged_note:
            notes.append(f"- ¹ **{r.method}**: merged latency {r.merged_note}")
        ratio = (f"{r.merged_latency_ms / r.base_latency_ms:.3f}" if r.merged_latency_ms and r.base_latency_ms
                 else "n/a")
        lines.append(
            f"| {r.method} | {r.lr:g} | {r.trainable_params:,} | {r.trainable_pct:.3f} | {_fmt(r.metric, 4)} | "
            f"{_fmt(r.train_samples_per_s, 1)} | {_fmt(r.peak_rss_mb, 0)} | {_size(r.saved_bytes)} | "
            f"{_fmt(r.base_latency_ms, 1)} | {_fmt(r.latency_ms, 1)} | {merged} | {ratio} |")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _csv(results: list[MethodResult], metric: str) -> str:
    names = [f.name for f in fields(MethodResult)]
    header = [metric if n == "metric" else n for n in names]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in results:
        writer.writerow(["" if v is None else v for v in asdict(r).values()])
    return buf.getvalue()


def _png(results: list[MethodResult], metric: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in results if not r.error]
    names = [r.method for r in ok]
    fig = Figure(figsize=(max(9.0, 1.6 * len(ok) + 4), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.bar(names, [r.metric or 0.0 for r in ok], color="tab:blue")
    ax1.set_title(f"{metric} (validation)")
    ax2.bar(names, [r.trainable_pct or 0.0 for r in ok], color="tab:orange")
    ax2.set_yscale("log")
    ax2.set_title("trainable parameters (%)")
    x = range(len(ok))
    ax3.bar([i - 0.27 for i in x], [r.base_latency_ms or 0.0 for r in ok], width=0.27, label="base", color="0.6")
    ax3.bar(list(x), [r.latency_ms or 0.0 for r in ok], width=0.27, label="unmerged")
    ax3.bar([i + 0.27 for i in x], [r.merged_latency_ms or 0.0 for r in ok], width=0.27, label="merged")
    for i, r in enumerate(ok):
        if r.merged_latency_ms is None:
            ax3.text(i + 0.27, 0, "n/a", ha="center", va="bottom", fontsize="x-small", rotation=90)
    ax3.set_xticks(list(x), names)
    ax3.set_title(f"latency, ms per batch of {LATENCY_BATCH}")
    ax3.legend(fontsize="small")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", rotation=45)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _write_outputs(out: Path, results: list[MethodResult], metric: str, run: RunConfig, command: str,
                   repeats: int) -> None:
    atomic_write_text(out / "compare.md", _markdown(results, metric, run, command, repeats))
    atomic_write_text(out / "compare.csv", _csv(results, metric))
    atomic_write_bytes(out / "compare.png", _png(results, metric))
