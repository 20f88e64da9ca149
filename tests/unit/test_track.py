"""Unit tests for tuneforge.track: atomic writes, metrics logging, plots, report, resources."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

from tuneforge.track import (
    MetricsLogger,
    Stopwatch,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    cpu_info,
    current_rss_mb,
    peak_rss_mb,
    read_metrics,
    write_plots,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------- atomic


def test_atomic_writers_produce_content_and_no_temp_files(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"z": 1, "a": [1.5, math.nan, math.inf], "p": tmp_path})
    atomic_write_yaml(tmp_path / "d.yaml", {"b": 2, "a": {"x": [1, 2]}})
    atomic_write_text(tmp_path / "b2.txt", "old")
    atomic_write_text(tmp_path / "b2.txt", "new")

    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b2.txt").read_text() == "new"
    text = (tmp_path / "c.json").read_text()
    assert text.endswith("}\n") and '\n  "z": 1' in text
    assert list(json.loads(text)) == ["z", "a", "p"]  # key order kept
    assert json.loads(text)["a"] == [1.5, None, None]
    assert json.loads(text)["p"] == str(tmp_path)
    loaded = yaml.safe_load((tmp_path / "d.yaml").read_text())
    assert loaded == {"b": 2, "a": {"x": [1, 2]}} and list(loaded) == ["b", "a"]
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_directory_replaces_existing(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-") and tmp != final
        (tmp / "model.bin").write_bytes(b"weights")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "x.json").write_text("{}")
        assert (final / "stale.txt").exists()  # old content visible until the block ends
    assert sorted(p.name for p in final.iterdir()) == ["model.bin", "nested"]
    assert (final / "model.bin").read_bytes() == b"weights"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_creates_new(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "new") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "new" / "f").read_text() == "1"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_exception_keeps_old(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "model.bin").write_bytes(b"good")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(final) as tmp:
        (tmp / "model.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert (final / "model.bin").read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --------------------------------------------------------------------------- logger


def test_logger_writes_lines_and_nan_is_null(tmp_path: Path) -> None:
    before = time.time()
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, "train", {"loss": 2.5, "lr": 1e-3}, epoch=0)
        logger.log(2, "eval", {"loss": math.nan, "accuracy": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["step", "split", "loss", "lr", "epoch", "time"]
    assert first["step"] == 1 and first["split"] == "train" and first["loss"] == 2.5 and first["epoch"] == 0
    assert first["time"] >= before
    assert second["loss"] is None and second["accuracy"] == 0.5
    assert "NaN" not in lines[1]


def test_logger_resume_truncates_later_records(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, "train", {"loss": float(step)})
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        logger.log(4, "train", {"loss": 40.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 40.0
    assert _leftovers(tmp_path) == []


def test_logger_without_resume_appends(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, "train", {"loss": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, "train", {"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_read_metrics_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "split": "tr')
    assert read_metrics(tmp_path) == [{"step": 1, "split": "train", "loss": 1.0}]
    assert read_metrics(tmp_path / "missing") == []
    # A logger opened on the crashed file drops the partial line before appending.
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, "train", {"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_logger_tensorboard_events(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, "train", {"loss": 1.0, "note": "text"}, tokens=10)  # type: ignore[dict-item]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    with MetricsLogger(tmp_path, resume_step=1) as logger:
        logger.log(2, "train", {"loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# --------------------------------------------------------------------------- plots


def _write_records(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


def test_write_plots_all_three(tmp_path: Path) -> None:
    records: list[dict] = []
    for step in range(1, 21):
        records.append({"step": step, "split": "train", "loss": 3.0 / step, "lr": 1e-3 * step / 20})
        if step % 5 == 0:
            records.append(
                {
                    "step": step, "split": "eval", "loss": 2.0 / step, "accuracy": step / 20,
                    "f1/cat": 0.3, "confusion_matrix": [[1, 0], [0, 1]], "epoch": 1,
                }
            )  # fmt: skip
    records.append({"step": 21, "split": "train", "loss": None})  # odd data: skipped
    records.append({"split": "eval", "accuracy": "n/a"})
    _write_records(tmp_path, records)
    written = write_plots(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["eval_metrics.png", "loss.png", "lr.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert _leftovers(tmp_path / "plots") == []


def test_write_plots_without_eval(tmp_path: Path) -> None:
    _write_records(tmp_path, [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 5)])
    written = write_plots(tmp_path)
    assert [p.name for p in written] == ["loss.png"]
    assert not (tmp_path / "plots" / "eval_metrics.png").exists()
    assert write_plots(tmp_path / "empty") == []


# --------------------------------------------------------------------------- report


def test_write_report_tables(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.png").write_bytes(PNG_MAGIC)
    summary = {
        "title": "demo run",
        "command": "tuneforge train recipe.yaml",
        "config": {"model": {"name": "tiny"}, "lr": 0.001},
        "final_metrics": {
            "train": {"loss": 1.234567, "steps": 100},
            "eval": {
                "loss": 0.98765,
                "accuracy": 0.5,
                "per_class": {"cat": {"f1": 0.81234, "support": 10}, "dog": {"f1": 0.7, "support": 12}},
                "confusion_matrix": [[8, 2], [3, 9]],
                "labels": ["cat", "dog"],
                "perplexity": math.nan,
            },
        },
        "throughput": {"train_samples_per_s": 12.3456789, "train_tokens_per_s": 4096.0},
        "peak_rss_mb": 512.25,
        "wall_time_s": 125.0,
        "trainable_params": 1000,
        "total_params": 4000,
        "hardware": {"cpu": "Test CPU", "cores": 4, "bf16": False},
        "notes": ["early stopped"],
        "samples": [{"input": "a | b", "prediction": "cat"}, {"input": "c", "prediction": "dog"}],
    }
    path = write_report(tmp_path, summary)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert text.startswith("# demo run\n")
    assert "| loss | 1.2346 |" in text and "| steps | 100 |" in text
    assert "| loss | 0.9877 |" in text and "| accuracy | 0.5000 |" in text
    assert "| perplexity | nan |" in text
    assert "| cat | 0.8123 | 10 |" in text and "| dog | 0.7000 | 12 |" in text
    assert "| true \\ pred | cat | dog |" in text and "| cat | 8 | 2 |" in text and "| dog | 3 | 9 |" in text
    assert "| train_samples_per_s | 12.3457 |" in text
    assert "1,000 (25.00% of total)" in text and "512.2 MiB" in text and "2m 05s" in text
    assert "![loss](plots/loss.png)" in text and "lr.png" not in text
    assert "```yaml\nmodel:\n  name: tiny\nlr: 0.001\n```" in text
    assert "tuneforge train recipe.yaml" in text and "- early stopped" in text
    assert "| a \\| b | cat |" in text and "| Test CPU |" in text
    assert _leftovers(tmp_path) == []


def test_write_report_minimal(tmp_path: Path) -> None:
    text = write_report(tmp_path, {"title": "t"}).read_text()
    assert text == "# t\n"


# --------------------------------------------------------------------------- resources


def test_peak_rss_grows_after_allocation() -> None:
    import mmap

    before = peak_rss_mb()
    assert before > 0 and current_rss_mb() > 0
    # Map fresh pages (not heap memory an earlier test freed, which is resident already) enough to push past
    # any earlier peak, then touch every page.
    size = int((200 + max(0.0, before - current_rss_mb())) * 1024 * 1024)
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    after = peak_rss_mb()
    block.close()
    assert after > before + 100


def test_cpu_info_and_stopwatch() -> None:
    info = cpu_info()
    assert set(info) == {"cpu", "cores", "threads", "bf16"}
    assert isinstance(info["bf16"], bool) and isinstance(info["cpu"], str)
    assert info["threads"] is None or info["threads"] >= 1
    watch = Stopwatch().start()
    time.sleep(0.01)
    elapsed = watch.stop()
    assert elapsed >= 0.01 and watch.elapsed == elapsed
