"""What the UI reads from the runs folder: run directories, their status, metrics, configs and tables.

A run directory is what `tuneforge train` writes (see `tuneforge.track`): ``config.yaml`` at the start,
``metrics.jsonl`` as it trains (one record per log/eval step), checkpoints under ``checkpoints/``, and at
the end ``metrics.json``, ``report.md``, ``plots/`` and ``model/``. Runs are found up to three levels
deep, so the runs that ``tuneforge compare`` and ``tuneforge forgetting-table`` train (``<out>/<method>``)
are listed too.

Every path the UI touches is resolved through `RunsFolder.resolve`, which refuses anything outside the
runs folder (``..``, absolute paths, symlinks that leave it).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneforge.track.logger import METRICS_FILE, _parse_lines

__all__ = ["PathRefused", "RunSummary", "RunsFolder", "TableDir", "config_diff", "flatten", "read_metrics_from",
           "summarize"]

UI_DIR = ".tuneforge-ui"  # launcher records and logs, inside the runs folder
_SKIP = {"checkpoints", "model", "plots", "tensorboard", "logs", UI_DIR}
_MAX_DEPTH = 3
#: a run whose metrics file changed this recently, with no process known to the UI, counts as running
RUNNING_WINDOW_S = 120.0


class PathRefused(ValueError):
    """A path that is not inside the runs folder (the UI answers 404 and never reads it)."""


class RunsFolder:
    """The runs folder the UI serves; ids are POSIX paths relative to it (``bert``, ``compare-x/lora``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def resolve(self, rel: str) -> Path:
        """``root / rel`` resolved; `PathRefused` when it leaves the folder or names a hidden/internal part."""
        if not rel or "\x00" in rel or Path(rel).is_absolute() or "\\" in rel:
            raise PathRefused(f"not a path inside the runs folder: {rel!r}")
        path = (self.root / rel).resolve()
        if path != self.root and not path.is_relative_to(self.root):
            raise PathRefused(f"{rel!r} is outside the runs folder")
        if any(part.startswith(".") for part in path.relative_to(self.root).parts):
            raise PathRefused(f"{rel!r} names a hidden entry")
        return path

    def contains(self, path: str | Path) -> bool:
        """Whether ``path`` (absolute or relative to the working directory) lies inside the runs folder."""
        p = Path(path).resolve()
        return p != self.root and p.is_relative_to(self.root)

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def _walk(self) -> list[Path]:
        found: list[Path] = []

        def visit(d: Path, depth: int) -> None:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                return
            for c in children:
                if c.name.startswith(".") or c.name in _SKIP:
                    continue
                found.append(c)
                if depth < _MAX_DEPTH:
                    visit(c, depth + 1)

        if self.root.is_dir():
            visit(self.root, 1)
        return found

    def runs(self) -> list[Path]:
        """Run directories (they hold ``config.yaml``), newest first."""
        runs = [d for d in self._walk() if (d / "config.yaml").is_file()]
        return sorted(runs, key=lambda d: _mtime(d), reverse=True)

    def tables(self) -> list[TableDir]:
        """Output folders of ``tuneforge compare`` and ``tuneforge forgetting-table``."""
        out = []
        for d in self._walk():
            if (d / "compare.md").is_file():
                out.append(TableDir(self.rel(d), "compare", d))
            elif (d / "forgetting_table.md").is_file():
                out.append(TableDir(self.rel(d), "forgetting", d))
        return out


@dataclass
class TableDir:
    id: str
    kind: str  # compare | forgetting
    path: Path

    @property
    def markdown(self) -> str:
        name = "compare.md" if self.kind == "compare" else "forgetting_table.md"
        return (self.path / name).read_text(encoding="utf-8", errors="replace")

    @property
    def plot(self) -> str | None:
        name = "compare.png" if self.kind == "compare" else "forgetting_table.png"
        return name if (self.path / name).is_file() else None

    def runs(self) -> list[str]:
        """Sub-folders that are runs (one per method or variant)."""
        return sorted(d.name for d in self.path.iterdir() if d.is_dir() and (d / "config.yaml").is_file())


def _mtime(d: Path) -> float:
    stamps = [p.stat().st_mtime for p in (d / METRICS_FILE, d / "config.yaml") if p.exists()]
    return max(stamps, default=0.0)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a tree ({} when unreadable)."""
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics_from(run_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int, bool]:
    """Records of ``metrics.jsonl`` from byte ``offset`` on: (records, next offset, reset).

    Only whole lines are read (a line being written is left for the next poll). ``reset`` is true when
    the file is shorter than ``offset`` (a resumed run cut it back), and the records are then all of them.
    """
    path = run_dir / METRICS_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0, offset > 0
    reset = size < offset
    start = 0 if reset else offset
    with path.open("rb") as f:
        f.seek(start)
        chunk = f.read(size - start)
    end = chunk.rfind(b"\n") + 1
    records = _parse_lines(chunk[:end].decode("utf-8", errors="replace"), path)
    return records, start + end, reset


@dataclass
class RunSummary:
    """One row of the runs list."""

    id: str
    task: str
    method: str
    model: str
    status: str  # running | finished | failed | stopped
    metric: str | None = None
    best: float | None = None
    best_step: int | None = None
    wall_s: float | None = None
    step: int | None = None
    updated: float = 0.0
    job: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def wall(self) -> str:
        if self.wall_s is None:
            return ""
        s = round(self.wall_s)
        return f"{s // 3600}h {s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _name(block: Any, default: str = "") -> str:
    if isinstance(block, dict):
        return str(block.get("name", default))
    return str(block) if block is not None else default


def status_of(run_dir: Path, job: dict[str, Any] | None) -> str:
    """running / finished / failed / stopped.

    A process the UI launched decides (exit 0: finished; SIGINT, exit 130: stopped; else failed). A run
    started elsewhere: ``metrics.json`` (written last) means finished; a metrics file written in the last
    two minutes, running; checkpoints to resume from, stopped; else failed.
    """
    if job is not None:
        if job.get("alive"):
            return "running"
        code = job.get("returncode")
        if code is not None:
            return "finished" if code == 0 else "stopped" if code in (130, -2) else "failed"
    if (run_dir / "metrics.json").is_file():
        return "finished"
    if time.time() - _mtime(run_dir) < RUNNING_WINDOW_S:
        return "running"
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "stopped"
    return "failed"


def _best(records: list[dict[str, Any]], train: dict[str, Any], cfg: dict[str, Any]) -> tuple[str | None, float | None,
                                                                                               int | None]:
    """(metric name, best value, its step): from metrics.json when finished, else the eval records."""
    evals = [r for r in records if r.get("split") == "eval"]
    best, step = train.get("best_metric"), train.get("best_step")
    name = (cfg.get("train") or {}).get("metric")
    if best is not None and name is None and step is not None:  # which eval key held the best value
        at = next((r for r in evals if r.get("step") == step), {})
        name = next((k for k, v in at.items() if k not in ("step", "time") and isinstance(v, float)
                     and math.isclose(v, best, rel_tol=1e-9)), None)
    if best is None and evals:
        name = name or next((k for k in evals[-1] if k not in ("step", "split", "time") and "/" not in k), None)
        values = [(r[name], r["step"]) for r in evals if isinstance(r.get(name), (int, float))]
        if values:
            lower = name is not None and name.endswith("loss")
            best, step = (min if lower else max)(values)
    return name, best, step


def summarize(folder: RunsFolder, run_dir: Path, job: dict[str, Any] | None = None,
              planned: dict[str, Any] | None = None) -> RunSummary:
    """The runs-list row of ``run_dir`` (``planned``: the config of a launched run not started yet)."""
    cfg = read_config(run_dir) or planned or {}
    records, _, _ = read_metrics_from(run_dir)
    final = read_json(run_dir / "metrics.json") or {}
    train = final.get("train") or {}
    status = status_of(run_dir, job)
    name, best, step = _best(records, train, cfg)
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    start = min([*times, (run_dir / "config.yaml").stat().st_mtime]) if (run_dir / "config.yaml").exists() else \
        min(times, default=None)
    if job is not None and isinstance(job.get("started"), (int, float)):
        start = job["started"]
    if status == "finished" and (run_dir / "metrics.json").exists():
        end: float | None = (run_dir / "metrics.json").stat().st_mtime
    elif status == "running":
        end = time.time()
    else:
        end = max(times, default=None)
    steps = [r["step"] for r in records if r.get("split") == "train" and isinstance(r.get("step"), int)]
    wall = _report_wall(run_dir) if status == "finished" else None
    if wall is None and start is not None and end is not None:
        wall = end - start
    return RunSummary(
        id=folder.rel(run_dir), task=_name(cfg.get("task"), "?"), method=_name(cfg.get("method"), "?"),
        model=_name(cfg.get("model"), "?"), status=status, metric=name, best=best, best_step=step,
        wall_s=wall,
        step=max(steps, default=None), updated=_mtime(run_dir), job=job)


def _report_wall(run_dir: Path) -> float | None:
    """The whole run's wall time as ``report.md`` states it (model loading included)."""
    try:
        text = (run_dir / "report.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"^\| wall time \| ([\d.]+) s", text, re.M)
    return float(m.group(1)) if m else None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists stay values (shown as JSON)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree} if prefix else {}


def config_diff(configs: dict[str, dict[str, Any]]) -> list[tuple[str, list[str], bool]]:
    """Rows (key, one value per run, differs) over the union of the runs' flattened configs."""
    flat = {rid: flatten(c) for rid, c in configs.items()}
    keys: list[str] = []
    for f in flat.values():
        keys += [k for k in f if k not in keys]
    rows = []
    for k in keys:
        values = [_show(f.get(k, "—")) for f in flat.values()]
        rows.append((k, values, len(set(values)) > 1))
    return rows


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def log_tail(path: Path, lines: int = 30, max_bytes: int = 64_000) -> str:
    """The last ``lines`` lines of a log (progress bars' carriage returns become line ends)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, os.path.getsize(path) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    parts = [p for p in text.replace("\r", "\n").split("\n") if p.strip()]
    return "\n".join(parts[-lines:])
