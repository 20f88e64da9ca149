"""`tuneforge compare` as a user runs it: four methods on tiny-bert, then the table, CSV and chart; and the
fail-fast paths (unknown method, a method refused for the model) that must stop before anything trains."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "tuneforge"
METHODS = ("full", "frozen", "adapter", "bitfit")
NUMERIC = ("lr", "trainable_params", "total_params", "trainable_pct", "accuracy", "train_samples_per_s",
           "train_seconds", "peak_rss_mb", "saved_bytes", "base_latency_ms", "latency_ms")


def _env() -> dict[str, str]:
    env = dict(os.environ, TUNEFORGE_CACHE=str(CACHE), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("TUNEFORGE_DEBUG", None)
    return env


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=timeout)


def _bias_and_head_params() -> tuple[int, int]:
    from transformers import AutoModelForSequenceClassification

    from tuneforge.models import resolve_model

    m = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny-bert"), num_labels=3)
    head = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("classifier.", "bert.pooler.")))
    biases = sum(p.numel() for n, p in m.named_parameters() if n.endswith(".bias") and "pooler" not in n
                 and not n.startswith("classifier."))
    return biases, head


def test_compare_four_methods(tmp_path: Path, tiny_csv) -> None:
    out = tmp_path / "cmp"
    data = tiny_csv(40)
    res = _cli("compare", "model=tiny-bert", f"data.train={data}", f"methods={','.join(METHODS)}",
               "train.max_steps=5", "train.batch_size=8", "train.tensorboard=false", f"output_dir={out}", "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("compare.md", "compare.csv", "compare.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = list(csv.DictReader((out / "compare.csv").open(encoding="utf-8")))
    assert [r["method"] for r in rows] == list(METHODS)
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["error"] == "", r
        for col in NUMERIC:
            float(r[col])  # numeric, not blank
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["peak_rss_mb"]) > 100  # a real process with torch loaded
        assert (out / r["method"] / "metrics.json").is_file()  # each method's own run directory
    # parameter counts against the formulas (tiny-bert: hidden 32, 2 layers, 3 labels, default adapters b=2)
    biases, head = _bias_and_head_params()
    total = int(by["full"]["total_params"])
    assert int(by["full"]["trainable_params"]) == total and float(by["full"]["trainable_pct"]) == 100.0
    assert int(by["frozen"]["trainable_params"]) == head == 32 * 32 + 32 + 32 * 3 + 3
    assert int(by["adapter"]["trainable_params"]) == head + 2 * 2 * (2 * 32 * 2 + 32 + 2)
    assert int(by["adapter"]["total_params"]) == total + 2 * 2 * (2 * 32 * 2 + 32 + 2)
    assert int(by["bitfit"]["trainable_params"]) == head + biases
    assert float(by["bitfit"]["trainable_pct"]) == pytest.approx(100 * (head + biases) / total)
    # adapter-only saves are far smaller than a whole model; merge exists for bitfit only here
    assert int(by["adapter"]["saved_bytes"]) * 10 < int(by["full"]["saved_bytes"])
    assert int(by["bitfit"]["saved_bytes"]) * 10 < int(by["full"]["saved_bytes"])
    assert float(by["bitfit"]["merged_latency_ms"]) > 0
    assert by["adapter"]["merged_latency_ms"] == "" and "non-linear" in by["adapter"]["merged_note"]
    assert by["full"]["merged_latency_ms"] == "" and by["full"]["merged_note"].startswith("n/a")

    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "tuneforge compare model=tiny-bert" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(METHODS)
    assert table[0].startswith("| method | lr | trainable params | trainable % | accuracy |")
    assert table[0].endswith("| base latency (ms) | latency (ms) | merged latency (ms) | merged / base |")
    bitfit = next(line for line in table if line.startswith("| bitfit "))
    ratio = float(by["bitfit"]["merged_latency_ms"]) / float(by["bitfit"]["base_latency_ms"])
    assert bitfit.endswith(f"| {ratio:.3f} |")


def test_unknown_method_fails_fast_with_registered_list(tmp_path: Path, tiny_csv) -> None:
    res = _cli("compare", "model=tiny-bert", f"data.train={tiny_csv(40)}", "methods=full,nosuch",
               f"output_dir={tmp_path / 'cmp'}")
    assert res.returncode == 2
    assert "unknown method(s) nosuch; registered:" in res.stderr and "adapter" in res.stderr
    assert not (tmp_path / "cmp").exists()


def test_refused_method_fails_before_training(tmp_path: Path, tiny_csv) -> None:
    res = _cli("compare", "model=tiny-llama", f"data.train={tiny_csv(40)}", "methods=adapter,bitfit",
               f"output_dir={tmp_path / 'cmp'}")
    assert res.returncode == 2
    assert "config error at 'method'" in res.stderr and "bitfit" in res.stderr
    assert not (tmp_path / "cmp").exists()  # nothing trained, nothing written


def test_method_options_are_refused() -> None:
    from tuneforge.compare import split_overrides
    from tuneforge.errors import ConfigError

    assert split_overrides(["methods=full, lora", "output_dir=x", "train.lr=1e-3"]) == (
        ["full", "lora"], Path("x"), ["train.lr=1e-3"])
    with pytest.raises(ConfigError) as info:
        split_overrides(["methods=full", "method.r=8"])
    assert info.value.key == "method.r"
