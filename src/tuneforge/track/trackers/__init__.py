"""Experiment trackers that mirror a run's metrics: TensorBoard, MLflow, Weights & Biases (``train.report_to``).

``metrics.jsonl`` stays the source of truth (plots and the report are rebuilt from it); a tracker is a mirror
for the tool a team already uses. Each tracker is one module in this package exposing ``TRACKER`` (a class
following `Tracker`), registered here by name with `register_tracker`: adding one is a module plus one
line, and nothing else names trackers (the config validates ``report_to`` against this registry, the
pipeline iterates the `Trackers` session).

The registry maps names to module paths and imports a module only when the tracker is used, so the config
(and ``tuneforge`` itself) never imports mlflow or wandb; a tracker whose optional package is missing fails
before the run starts with the one line that installs it (``pip install 'tuneforge[mlflow]'``).

A run directory remembers each tracker's run (``trackers.json``: the MLflow run id and store, the W&B run
id), so ``tuneforge train --resume`` continues the same tracker run instead of starting a new one.
Only the main process logs (``Runtime.is_main``): the other ranks get an empty session.
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from tuneforge.errors import ConfigError

__all__ = [
    "STATE_FILE",
    "Tracker",
    "TrackerContext",
    "Trackers",
    "flatten_config",
    "register_tracker",
    "require_extra",
    "tracker_class",
    "tracker_names",
]

STATE_FILE = "trackers.json"

_MODULES: dict[str, str] = {}


def register_tracker(name: str, module: str) -> None:
    """Make tracker ``name`` available to ``train.report_to``; ``module`` exposes ``TRACKER``. A second
    registration of a name is an error (as for methods and objectives)."""
    if name in _MODULES and _MODULES[name] != module:
        raise ValueError(f"a tracker named '{name}' is already registered ({_MODULES[name]})")
    _MODULES[name] = module


register_tracker("tensorboard", "tuneforge.track.trackers.tensorboard")
register_tracker("mlflow", "tuneforge.track.trackers.mlflow")
register_tracker("wandb", "tuneforge.track.trackers.wandb")


def tracker_names() -> list[str]:
    """The registered tracker names, in registration order."""
    return list(_MODULES)


def tracker_class(name: str) -> type[Tracker]:
    """The class of tracker ``name`` (imports its module, not its optional package)."""
    if name not in _MODULES:
        raise ConfigError(f"unknown tracker '{name}'; allowed: {', '.join(_MODULES)}, none", key="train.report_to")
    return importlib.import_module(_MODULES[name]).TRACKER


def require_extra(module: str, extra: str, tracker: str) -> Any:
    """Import ``module`` or raise the one-line `ConfigError` saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"train.report_to has '{tracker}' but the '{module}' package is not installed "
                          f"({e.msg}); install it with: pip install 'tuneforge[{extra}]'",
                          key="train.report_to") from None


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.001", "method.r": "8", ...}``: nested mappings (and lists of mappings, by index)
    joined with dots; other values as JSON text (strings as they are), so every value is one string."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten_config(item, f"{name}.{i}."))
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def scalar(value: Any) -> float | None:
    """A finite float, or None (bools, strings, NaN/inf and tensors that are not 0-d are not logged)."""
    if isinstance(value, bool):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        try:
            value = value.item()
        except Exception:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class TrackerContext:
    """What a tracker needs to start: where the run lives, its resolved config, and on ``--resume`` the
    step it resumes from and the state the tracker saved (its run id)."""

    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    resume_step: int | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.run_dir.resolve().name


class Tracker(Protocol):
    """One tracker's run. ``check`` runs before anything is created (a missing extra is a config error);
    the constructor starts (or, on resume, reopens) the tracker run; ``state`` is saved to trackers.json."""

    name: ClassVar[str]

    @classmethod
    def check(cls) -> None: ...

    def __init__(self, ctx: TrackerContext) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def log(self, step: int, split: str, scalars: Mapping[str, float]) -> None: ...

    def log_artifacts(self, run_dir: Path, paths: list[Path]) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: str) -> None: ...


class Trackers:
    """The trackers of one run, used as one: built (and checked) early, started once the run directory
    exists, fed every metrics row, given the report and plots at the end, then closed.

    ``status`` on close is ``finished``, ``failed`` or ``killed`` (Ctrl-C); a session that is never finished
    (the process dies after training) is closed as ``failed`` at exit.
    """

    def __init__(self, names: Iterable[str], *, enabled: bool = True, config: Mapping[str, Any] | None = None) -> None:
        self.names = list(names) if enabled else []
        self.config = dict(config or {})
        self.classes = [tracker_class(n) for n in self.names]
        for cls in self.classes:
            cls.check()
        self.active: list[Any] = []
        self._closed = False

    @classmethod
    def for_run(cls, run: Any, *, enabled: bool = True) -> Trackers:
        """The session for ``run.train.trackers`` (empty where ``enabled`` is false: non-main ranks), carrying
        the resolved config exactly as the run's config.yaml holds it."""
        import yaml

        from tuneforge.config import to_yaml

        config = yaml.safe_load(to_yaml(run)) if enabled and run.train.trackers else {}
        return cls(run.train.trackers, enabled=enabled, config=config)

    def start(self, run_dir: Path, resume_step: int | None = None) -> Trackers:
        """Start every tracker (reopening the runs recorded in ``run_dir/trackers.json`` on resume)."""
        run_dir = Path(run_dir)
        saved = _read_state(run_dir) if resume_step is not None else {}
        try:
            for cls in self.classes:
                ctx = TrackerContext(run_dir, self.config, resume_step, dict(saved.get(cls.name) or {}))
                self.active.append(cls(ctx))
        except BaseException:
            self.close("failed")  # those already started
            raise
        states = {t.name: s for t in self.active if (s := t.state())}
        if states:
            from tuneforge.track.atomic import atomic_write_json

            atomic_write_json(run_dir / STATE_FILE, {**saved, **states})
        if self.active:
            atexit.register(self._at_exit)
        return self

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        scalars = {k: v for k, raw in metrics.items() if (v := scalar(raw)) is not None}
        for t in self.active:
            t.log(step, split, scalars)

    def flush(self) -> None:
        for t in self.active:
            t.flush()

    def finish(self, run_dir: Path) -> None:
        """Upload the run's report, plots, final metrics and recipe, then close every tracker as finished."""
        if self._closed or not self.active:
            return
        run_dir = Path(run_dir)
        names = ["report.md", "metrics.json", "config.yaml"]
        paths = [run_dir / n for n in names if (run_dir / n).is_file()]
        paths += sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
        for t in self.active:
            try:
                t.log_artifacts(run_dir, paths)
            except Exception as e:  # the run itself is done and saved: a tracker upload must not fail it
                warnings.warn(f"{t.name}: could not upload the run's files: {e}", RuntimeWarning, stacklevel=2)
        self.close("finished")

    def close(self, status: str) -> None:
        """Close every tracker run with ``status`` (finished, failed, killed); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for t in self.active:
            try:
                t.close(status)
            except Exception as e:
                warnings.warn(f"{t.name}: could not close the tracker run: {e}", RuntimeWarning, stacklevel=2)
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self.close("failed")


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
