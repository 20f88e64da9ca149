"""`tuneforge forgetting-table`: variants train in child processes and the table reports each one's numbers
as its run's forgetting block has them; bad settings exit 2 before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _common import cli, sentiment_rows, write_csv

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("forgetting-table")
    write_csv(d / "train.csv", sentiment_rows(48))
    write_csv(d / "val.csv", sentiment_rows(12, offset=48))
    write_csv(d / "general-eval.csv", sentiment_rows(12, offset=200))
    write_csv(d / "general-train.csv", sentiment_rows(24, offset=300))
    return d


BASE = ["model=tiny-bert", "data.train=train.csv", "data.validation=val.csv", "task.general_eval=general-eval.csv",
        "train.max_steps=4", "train.batch_size=8", "train.lr=1e-2", "train.tensorboard=false"]


def test_table_reports_each_variant_from_its_run(workdir: Path) -> None:
    proc = cli("forgetting-table", *BASE, "variants=none,l2sp,replay", "variant.l2sp.alpha=5",
               "general_train=general-train.csv", "output_dir=table", cwd=workdir)
    rows = json.loads((workdir / "table" / "forgetting_table.json").read_text(encoding="utf-8"))
    assert [r["variant"] for r in rows] == ["none", "l2sp", "replay"]
    for r in rows:
        block = json.loads((workdir / "table" / r["variant"] / "metrics.json").read_text(encoding="utf-8"))["forgetting"]
        assert r["general_after"] == block["general"]["accuracy"]["after"]
        assert r["general_loss_change"] == block["general"]["loss"]["change"]
        assert r["error"] is None
    saved = (workdir / "table" / "l2sp" / "config.yaml").read_text(encoding="utf-8")
    assert "l2sp" in saved and "alpha: 5.0" in saved
    assert "replay" in (workdir / "table" / "replay" / "config.yaml").read_text(encoding="utf-8")
    assert (workdir / "table" / "forgetting_table.png").stat().st_size > 1000
    assert "| l2sp |" in proc.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["variants=none,ewc"], "config error at 'general_train'"),
    (["variants=none,zzz"], "unknown variant 'zzz'"),
])
def test_bad_settings_exit_2(workdir: Path, args: list[str], needle: str) -> None:
    proc = cli("forgetting-table", *BASE, *args, "output_dir=bad", cwd=workdir, check=False)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not (workdir / "bad").exists()


def test_needs_general_eval(workdir: Path) -> None:
    proc = cli("forgetting-table", *[a for a in BASE if "general_eval" not in a], "variants=none", "output_dir=bad2",
               cwd=workdir, check=False)
    assert proc.returncode == 2 and "task.general_eval" in proc.stderr
