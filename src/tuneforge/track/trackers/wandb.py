"""Weights & Biases: the resolved config, every metrics row, the report and plots as an artifact.

W&B's own settings apply as they are: online when logged in (``wandb login`` or ``WANDB_API_KEY``),
``WANDB_MODE=offline`` writes the run under ``run_dir/wandb/offline-run-*`` for a later ``wandb sync``,
``WANDB_PROJECT`` / ``WANDB_ENTITY`` pick where it goes (project ``tuneforge`` by default). Not logged in
and not offline is a config error that says both ways out, before the run starts (instead of W&B's
interactive prompt mid-run).

Steps: W&B drops rows whose ``step=`` is below the run's current step, which after ``--resume`` would
lose the recomputed steps; so every row carries ``global_step`` and the metrics are plotted against it
(``define_metric("*", step_metric="global_step")``), the way W&B documents for resumed runs. The run id is
saved in ``trackers.json`` and resumed with ``resume="allow"`` (in offline mode W&B starts a new local run
folder with the same id, which ``wandb sync`` appends to the same run).
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from tuneforge.errors import ConfigError
from tuneforge.track.trackers import TrackerContext, require_extra

__all__ = ["TRACKER", "WandbTracker"]

_ID_CHARS = string.ascii_lowercase + string.digits  # the alphabet of W&B run ids
_EXIT_CODES = {"finished": 0, "failed": 1, "killed": 130}


class WandbTracker:
    """One W&B run per tuneforge run (continued on resume)."""

    name: ClassVar[str] = "wandb"

    @classmethod
    def check(cls) -> None:
        """Installed, and (unless offline or disabled) logged in: checked without W&B's prompt or a network call."""
        wandb = require_extra("wandb", "wandb", "wandb")
        if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun", "disabled"):
            return
        if not wandb.login(prompt=False, verify=False):
            raise ConfigError("train.report_to has 'wandb' but W&B is not logged in: run `wandb login` or set "
                              "WANDB_API_KEY, or set WANDB_MODE=offline to write the run to files",
                              key="train.report_to")

    def __init__(self, ctx: TrackerContext) -> None:
        import wandb

        run_id = ctx.state.get("id") or "".join(secrets.choice(_ID_CHARS) for _ in range(8))
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tuneforge", name=ctx.run_name,
                                  dir=str(ctx.run_dir), config=ctx.config, id=run_id,
                                  resume="allow" if ctx.resume_step is not None else None,
                                  reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError, wandb.errors.CommError) as e:
            raise ConfigError(f"W&B could not start a run ({str(e).splitlines()[0]}); log in with `wandb login` or "
                              "WANDB_API_KEY, or set WANDB_MODE=offline to write the run to files",
                              key="train.report_to") from None
        self.run_id = run_id
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def state(self) -> dict[str, Any]:
        return {"id": self.run_id, "project": self.run.project}

    def log(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if scalars:
            self.run.log({"global_step": int(step), **{f"{split}/{k}": v for k, v in scalars.items()}})

    def log_artifacts(self, run_dir: Path, paths: list[Path]) -> None:
        """One W&B artifact (type ``run-report``) holding the report, final metrics, recipe and plots."""
        import wandb

        artifact = wandb.Artifact(f"{self.run_id}-report", type="run-report")
        for path in paths:
            artifact.add_file(str(path), name=path.relative_to(run_dir).as_posix())
        self.run.log_artifact(artifact)

    def flush(self) -> None:
        """W&B streams rows itself."""

    def close(self, status: str) -> None:
        self.run.finish(exit_code=_EXIT_CODES.get(status, 1))


TRACKER = WandbTracker
