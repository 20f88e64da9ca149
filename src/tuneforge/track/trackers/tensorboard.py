"""TensorBoard: scalars to ``run_dir/tensorboard`` (the default tracker; a core dependency).

On resume the writer purges events after the resumed step (``purge_step``), so TensorBoard's curves have
no "ghost" points from steps that were later recomputed. A broken TensorBoard install (protobuf clashes)
disables it with one warning instead of failing the run: the metrics are in metrics.jsonl anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from tuneforge.track.trackers import TrackerContext

__all__ = ["TENSORBOARD_DIR", "TRACKER", "TensorBoardTracker"]

TENSORBOARD_DIR = "tensorboard"
_warned = False


def _warn(exc: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"TensorBoard logging disabled: {exc}", RuntimeWarning, stacklevel=4)


class TensorBoardTracker:
    """Mirrors every scalar as ``split/name`` at its global step."""

    name: ClassVar[str] = "tensorboard"

    @classmethod
    def check(cls) -> None:
        """Nothing to check: a broken install only warns (see the module docstring)."""

    def __init__(self, ctx: TrackerContext) -> None:
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # ImportError, or a broken tensorboard/protobuf install
            _warn(exc)
            return
        kwargs: dict[str, Any] = {}
        if ctx.resume_step is not None:
            kwargs["purge_step"] = ctx.resume_step + 1
        try:
            self._writer = SummaryWriter(log_dir=str(ctx.run_dir / TENSORBOARD_DIR), **kwargs)
        except Exception as exc:
            _warn(exc)

    def state(self) -> dict[str, Any]:
        return {}

    def log(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(f"{split}/{key}", value, global_step=int(step))

    def log_artifacts(self, run_dir: Path, paths: list[Path]) -> None:
        """The files already sit beside the event files in the run directory."""

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


TRACKER = TensorBoardTracker
