"""Experiment trackers against their real stores, no mocks: a run logs to TensorBoard, MLflow (a sqlite tracking
store, artifacts under ./mlruns) and W&B (offline run files) at once, is interrupted after its step-4 checkpoint,
and is resumed. The oracle is metrics.jsonl: every tracker must hold the same per-step values, the resolved
config, and the report and plots, in the same tracker run before and after the resume. A missing extra is a
one-line config error (exit 2) naming the pip extra.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_rows, write_csv
from tuneforge.config import load_config
from tuneforge.track.trackers import STATE_FILE, flatten_config

pytestmark = pytest.mark.e2e

CRASH_AT_STEP = 5  # the step-4 checkpoint is complete; steps 1-4 are logged


def _args(tmp: Path, report_to: str) -> list[str]:
    data = write_csv(tmp / "train.csv", make_rows(30))
    return ["model=tiny-bert", f"data.train={data}", "train.batch_size=8", "train.max_steps=6", "train.log_steps=1",
            "train.eval_steps=2", "train.save_steps=2", "train.precision=fp32", f"train.report_to={report_to}",
            f"output_dir={tmp / 'run'}"]


def _rows(run: Path, split: str) -> dict[int, dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r for r in rows if r["split"] == split}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The interrupted-then-resumed run; what each tracker held after the crash, and the run directory."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from tuneforge.objectives.classification import ClassificationObjective
    from tuneforge.pipeline import train

    tmp = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's artifact root (./mlruns) is relative to the working directory
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "tuneforge-tests")
        mp.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(tmp / "wandb-home"))
        args = _args(tmp, "[tensorboard,mlflow,wandb]")
        original, calls = ClassificationObjective.loss, []

        def crashing_loss(self, outputs, batch):
            if torch.is_grad_enabled():  # training steps only, not evaluation
                calls.append(1)
                if len(calls) == CRASH_AT_STEP:
                    raise RuntimeError("simulated crash")
            return original(self, outputs, batch)

        mp.setattr(ClassificationObjective, "loss", crashing_loss)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(load_config(None, args), quiet=True)
        run = tmp / "run"
        first = json.loads((run / STATE_FILE).read_text())
        client = MlflowClient(first["mlflow"]["tracking_uri"])
        crashed = client.get_run(first["mlflow"]["run_id"]).info.status
        train(load_config(None, args), resume=True, quiet=True)
    return {"run": run, "first": first, "crashed_status": crashed, "client": client}


def test_mlflow_holds_params_metrics_and_artifacts_in_one_run(tracked: dict[str, Any]) -> None:
    run, client = tracked["run"], tracked["client"]
    state = json.loads((run / STATE_FILE).read_text())
    assert state["mlflow"] == tracked["first"]["mlflow"]  # the resume continued the same MLflow run
    assert tracked["crashed_status"] == "FAILED"
    info = client.get_run(state["mlflow"]["run_id"])
    assert info.info.status == "FINISHED"
    assert info.info.run_name == "run"
    # params: the resolved config, flattened
    import yaml

    expected = flatten_config(yaml.safe_load((run / "config.yaml").read_text()))
    assert info.data.params == {k: v for k, v in expected.items()}
    assert info.data.params["train.max_steps"] == "6" and info.data.params["model.name"] == "tiny-bert"
    # per-step metrics equal metrics.jsonl, each step once (the crash came before step 5 was logged)
    train_rows, eval_rows = _rows(run, "train"), _rows(run, "eval")
    loss = client.get_metric_history(info.info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6] == sorted(train_rows)
    assert [m.value for m in loss] == pytest.approx([train_rows[s]["loss"] for s in range(1, 7)], rel=1e-6)
    acc = client.get_metric_history(info.info.run_id, "eval/accuracy")
    assert {m.step: m.value for m in acc} == pytest.approx({s: r["accuracy"] for s, r in eval_rows.items()})
    # artifacts: report, plots, final metrics and recipe, byte for byte
    top = {a.path for a in client.list_artifacts(info.info.run_id)}
    assert {"report.md", "metrics.json", "config.yaml", "plots"} <= top
    plots = {a.path for a in client.list_artifacts(info.info.run_id, "plots")}
    assert "plots/loss.png" in plots
    local = Path(client.download_artifacts(info.info.run_id, "report.md", str(run.parent / "dl")))
    assert local.read_bytes() == (run / "report.md").read_bytes()


def _wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (a LevelDB-style log: 7-byte header, 32 KiB blocks,
    records split FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4), read without W&B's private reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_writes_the_run_files_and_resumes_the_same_id(tracked: dict[str, Any]) -> None:
    run = tracked["run"]
    run_id = json.loads((run / STATE_FILE).read_text())["wandb"]["id"]
    assert tracked["first"]["wandb"]["id"] == run_id
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # before and after resume
    history: dict[int, dict[str, Any]] = {}
    artifacts = []
    for f in files:
        for record in _wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history.setdefault(row["global_step"], {}).update(row)
            elif kind == "artifact":
                artifacts.append(record.artifact)
    train_rows = _rows(run, "train")
    assert sorted(s for s, r in history.items() if "train/loss" in r) == [1, 2, 3, 4, 5, 6]
    for step, row in train_rows.items():
        assert history[step]["train/loss"] == pytest.approx(row["loss"], rel=1e-6)
    (report,) = artifacts  # only the finished run uploads its report
    assert {"report.md", "metrics.json", "config.yaml", "plots/loss.png"} <= {e.path for e in report.manifest.contents}


def test_tensorboard_alias_and_report_to_together(tracked: dict[str, Any]) -> None:
    assert list((tracked["run"] / "tensorboard").glob("events.out.tfevents.*"))
    cfg = load_config(None, ["train.report_to=[mlflow]", "train.tensorboard=true"])
    assert cfg.train.trackers == ["tensorboard", "mlflow"]
    assert load_config(None, ["train.tensorboard=false"]).train.trackers == []
    assert load_config(None, ["train.report_to=none"]).train.trackers == []


def test_missing_extra_is_one_line_with_the_pip_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from tuneforge.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    monkeypatch.setattr(sys, "argv", ["tuneforge", "train", *_args(tmp_path, "[tensorboard,mlflow]")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install 'tuneforge[mlflow]'" in err and "train.report_to" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_wandb_not_logged_in_is_refused_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from tuneforge.errors import ConfigError
    from tuneforge.track.trackers import Trackers

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(ConfigError, match=r"W&B is not logged in: run `wandb login`.*WANDB_MODE=offline"):
        Trackers(["wandb"])
