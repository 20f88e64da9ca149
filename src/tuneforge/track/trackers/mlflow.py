"""MLflow: the resolved config as params, every metrics row per step, the report and plots as artifacts.

The store is ``MLFLOW_TRACKING_URI`` when set, else MLflow's own local default (``sqlite:///mlflow.db`` in
the working directory, artifacts under ``./mlruns``), which ``mlflow ui`` / ``mlflow server`` in that folder
shows. The experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``tuneforge``; the MLflow run is named after the run
directory and tagged with its path.

We use `MlflowClient` (explicit run ids) rather than the fluent ``mlflow.start_run`` API, whose process-wide
"active run" would clash with a user's own MLflow code or with several runs in one process (the UI).
On ``--resume`` the run id and store saved in ``trackers.json`` reopen the same MLflow run (status back to
RUNNING); params already there are kept (MLflow params are immutable: a value changed on resume is
reported, not logged). MLflow cannot delete metric points, so the steps between the last checkpoint and
an interruption appear twice at the same step (the recomputed value last); TensorBoard purges them.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from tuneforge.errors import ConfigError
from tuneforge.track.trackers import TrackerContext, flatten_config, require_extra

__all__ = ["TRACKER", "MLflowTracker"]

_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
_BATCH = 100  # MLflow's limit on params per log_batch call


def _quiet() -> None:
    """MLflow's sqlite store announces its table creation and migrations at INFO on every new store."""
    for name in ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MLflowTracker:
    """One MLflow run per tuneforge run (continued on resume)."""

    name: ClassVar[str] = "mlflow"

    @classmethod
    def check(cls) -> None:
        """The package is installed, and a plain-folder store is not one MLflow 3 refuses at the first call."""
        mlflow = require_extra("mlflow", "mlflow", "mlflow")
        uri = mlflow.get_tracking_uri()
        folder = urlparse(uri).scheme in ("", "file") and not uri.startswith("databricks")
        if folder and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri} is a folder store, which MLflow 3 refuses; use a database "
                              "(e.g. MLFLOW_TRACKING_URI=sqlite:///mlflow.db) or set MLFLOW_ALLOW_FILE_STORE=true",
                              key="train.report_to")

    def __init__(self, ctx: TrackerContext) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        _quiet()
        self.uri = ctx.state.get("tracking_uri") or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        run = None
        try:
            if ctx.state.get("run_id"):
                try:
                    run = self.client.get_run(ctx.state["run_id"])
                except MlflowException:
                    warnings.warn(f"MLflow run {ctx.state['run_id']} is no longer in {self.uri}; starting a new one",
                                  RuntimeWarning, stacklevel=2)
            if run is None:
                run = self.client.create_run(self._experiment(), run_name=ctx.run_name,
                                             tags={"tuneforge.run_dir": str(ctx.run_dir.resolve())})
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
            self.run_id = run.info.run_id
            self._log_params(flatten_config(ctx.config), dict(run.data.params))
        except MlflowException as e:
            raise ConfigError(f"MLflow store {self.uri}: {str(e).splitlines()[0]}", key="train.report_to") from None

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tuneforge"
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _log_params(self, params: dict[str, str], existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        values = {k: v[:_MAX_PARAM_VALUE] for k, v in params.items()}
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:
            warnings.warn(f"MLflow params are immutable; kept the first run's values of {', '.join(changed)}",
                          RuntimeWarning, stacklevel=3)
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + _BATCH], synchronous=True)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{split}/{k}", v, now, int(step)) for k, v in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def log_artifacts(self, run_dir: Path, paths: list[Path]) -> None:
        for path in paths:
            sub = path.parent.relative_to(run_dir).as_posix() if path.parent != run_dir else None
            self.client.log_artifact(self.run_id, str(path), artifact_path=sub)

    def flush(self) -> None:
        """Every call is synchronous: nothing is buffered."""

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FAILED"))


TRACKER = MLflowTracker
