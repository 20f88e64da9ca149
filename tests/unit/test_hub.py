"""Hugging Face Hub ids offline, against a Hub cache laid out as the Hub writes it (``models--org--name/`` with
``blobs/``, ``refs/main`` and ``snapshots/<commit>/`` symlinks into the blobs), built here from the tiny BERT and a
small CSV data set: ``model=org/name`` and ``data.train=hf://org/dataset[:split]`` resolve from it and train and
evaluate; an id missing from the cache fails with one line saying how to fetch it; ``tuneforge models`` lists the
cached model. Downloading (HF_HUB_OFFLINE=0) is not tested: the test machine has no network.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from pathlib import Path

import pytest

from conftest import make_rows, write_csv
from tuneforge.config import load_config
from tuneforge.errors import ConfigError, DataError
from tuneforge.models.registry import resolve_model


def put_repo(cache: Path, kind: str, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` (name in the repo -> local file) out as a cached Hub repo; return the snapshot folder."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline HF_HOME in tmp_path holding acme/tiny-bert (model) and acme/sentiment (data set)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = home / "hub"
    tiny = resolve_model("tiny-bert")
    put_repo(cache, "model", "acme/tiny-bert", {f.name: f for f in tiny.iterdir() if f.is_file()})
    train_csv = write_csv(tmp_path / "train.csv", make_rows(30))
    val_csv = write_csv(tmp_path / "validation.csv", make_rows(12))
    put_repo(cache, "dataset", "acme/sentiment", {"data/train.csv": train_csv, "data/validation.csv": val_csv})
    return cache


def test_hub_model_and_dataset_resolve_offline_and_train(hub_cache: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from tuneforge.cli import models
    from tuneforge.data.readers import read_table
    from tuneforge.inference import evaluate_file
    from tuneforge.pipeline import train

    folder = resolve_model("acme/tiny-bert")
    repo = hub_cache / "models--acme--tiny-bert"
    assert folder == repo / "snapshots" / (repo / "refs" / "main").read_text()
    assert (folder / "config.json").read_bytes() == (resolve_model("tiny-bert") / "config.json").read_bytes()
    # the data set's rows equal the CSV it was made from, split by file name
    with (tmp_path / "validation.csv").open(newline="") as f:
        want = list(csv.DictReader(f))
    table = read_table("hf://acme/sentiment:validation")
    assert table.columns == ["text", "label"] and table.rows == want and table.lines == list(range(1, 13))
    assert len(read_table("hf://acme/sentiment")) == 30  # the train split by default

    res = train(load_config(None, ["model=acme/tiny-bert", "data.train=hf://acme/sentiment",
                                   "data.validation=hf://acme/sentiment:validation", "train.batch_size=8",
                                   "train.max_steps=3", "train.precision=fp32", "train.report_to=none",
                                   f"output_dir={tmp_path / 'run'}"]), quiet=True)
    assert load_config(res.run_dir / "config.yaml").model.name == "acme/tiny-bert"
    again = evaluate_file(res.run_dir, tmp_path / "validation.csv", [])
    assert again["accuracy"] == pytest.approx(res.metrics["eval"]["accuracy"], abs=1e-6)  # the same rows, read as a file

    models()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("acme/tiny-bert"))
    assert "encoder" in line and "bert" in line and "cached" in line


def test_missing_hub_model_offline_is_one_line_saying_how_to_fetch(hub_cache: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tuneforge.cli import main

    with pytest.raises(ConfigError) as info:
        resolve_model("acme/not-there")
    msg = str(info.value)
    assert "`huggingface-cli download acme/not-there`" in msg and "HF_HUB_OFFLINE=0" in msg and "\n" not in msg
    data = write_csv(tmp_path / "t.csv", make_rows(12))
    monkeypatch.setattr(sys, "argv", ["tuneforge", "train", "model=acme/not-there", f"data.train={data}",
                                      f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "huggingface-cli download acme/not-there" in err
    assert not (tmp_path / "run").exists()


def test_missing_hub_dataset_or_split_offline(hub_cache: Path) -> None:
    from tuneforge.data.readers import read_table

    with pytest.raises(DataError, match=r"`huggingface-cli download --repo-type dataset acme/nothing`.*HF_HUB_OFFLINE=0"):
        read_table("hf://acme/nothing")
    with pytest.raises(DataError, match=r"no split 'test'; the data set has: train, validation"):
        read_table("hf://acme/sentiment:test")
