"""The tracker seam without any tracker package: a tracker is a module exposing ``TRACKER`` plus one
`register_tracker` line (this test module registers itself as one), and the session feeds it rows, saves its
state for ``--resume``, hands it the run's files and closes it with the right status; the config's
``report_to`` is checked against the registry, with ``train.tensorboard`` kept as an alias."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.track import MetricsLogger
from tuneforge.track.trackers import _MODULES, STATE_FILE, Trackers, flatten_config, register_tracker

EVENTS: list[tuple[Any, ...]] = []


class Recorder:
    """A tracker that records what it is given."""

    name: ClassVar[str] = "recorder"

    @classmethod
    def check(cls) -> None:
        EVENTS.append(("check",))

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        EVENTS.append(("start", ctx.resume_step, dict(ctx.state), ctx.run_name))

    def state(self) -> dict[str, Any]:
        return {"run_id": "r-1"}

    def log(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        EVENTS.append(("log", step, split, dict(scalars)))

    def log_artifacts(self, run_dir: Path, paths: list[Path]) -> None:
        EVENTS.append(("files", sorted(p.relative_to(run_dir).as_posix() for p in paths)))

    def flush(self) -> None:
        pass

    def close(self, status: str) -> None:
        EVENTS.append(("close", status))


TRACKER = Recorder


@pytest.fixture
def recorder() -> Iterator[list[tuple[Any, ...]]]:
    register_tracker("recorder", __name__)
    EVENTS.clear()
    yield EVENTS
    _MODULES.pop("recorder", None)


def test_flatten_config_joins_keys_and_keeps_one_string_per_value() -> None:
    got = flatten_config({"model": {"name": "tiny-bert", "layers": None}, "train": {"lr": 0.001, "betas": [0.9, 0.99],
                          "fp": False}, "extensions": [{"name": "samples", "count": 3}], "output_dir": "runs/x"})
    assert got == {"model.name": "tiny-bert", "model.layers": "null", "train.lr": "0.001", "train.betas": "[0.9, 0.99]",
                   "train.fp": "false", "extensions.0.name": "samples", "extensions.0.count": "3",
                   "output_dir": "runs/x"}


def test_a_registered_module_is_a_tracker_with_state_files_and_status(recorder: list, tmp_path: Path) -> None:
    cfg = load_config(None, ["train.report_to=[recorder]", f"output_dir={tmp_path}"])
    assert cfg.train.trackers == ["recorder"]
    session = Trackers.for_run(cfg)
    assert session.config["train"]["lr"] == cfg.lr  # the resolved config, as config.yaml holds it
    with MetricsLogger(tmp_path, trackers=session.start(tmp_path)) as logger:
        logger.log(1, "train", {"loss": 0.5, "ok": True, "nan": float("nan")})
    (tmp_path / "report.md").write_text("r")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.png").write_bytes(b"png")
    session.finish(tmp_path)
    assert recorder == [("check",), ("start", None, {}, tmp_path.name), ("log", 1, "train", {"loss": 0.5}),
                        ("files", ["plots/loss.png", "report.md"]), ("close", "finished")]
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"recorder": {"run_id": "r-1"}}

    recorder.clear()  # --resume: the saved state comes back; Ctrl-C closes the tracker run as killed
    resumed = Trackers(["recorder"]).start(tmp_path, resume_step=1)
    with pytest.raises(KeyboardInterrupt), MetricsLogger(tmp_path, trackers=resumed, resume_step=1):
        raise KeyboardInterrupt
    assert recorder == [("check",), ("start", 1, {"run_id": "r-1"}, tmp_path.name), ("close", "killed")]


def test_other_ranks_get_no_trackers(recorder: list, tmp_path: Path) -> None:
    session = Trackers(["recorder"], enabled=False).start(tmp_path)
    session.log(1, "train", {"loss": 1.0})
    session.finish(tmp_path)
    assert recorder == [] and not (tmp_path / STATE_FILE).exists()


def test_report_to_is_checked_against_the_registry() -> None:
    with pytest.raises(ConfigError, match="unknown tracker 'comet'; allowed: tensorboard, mlflow, wandb, none"):
        load_config(None, ["train.report_to=[comet]"])
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        load_config(None, ["train.report_to=[none,mlflow]"])
    assert load_config(None, []).train.trackers == ["tensorboard"]  # the default
    assert load_config(None, ["train.report_to=mlflow,wandb"]).train.trackers == ["mlflow", "wandb"]
    assert load_config(None, ["train.report_to=[mlflow]", "train.tensorboard=true"]).train.trackers == \
        ["tensorboard", "mlflow"]
    assert load_config(None, ["train.tensorboard=false"]).train.trackers == []
    with pytest.raises(ValueError, match="already registered"):
        register_tracker("mlflow", "somewhere.else")
