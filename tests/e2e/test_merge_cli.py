"""``tuneforge merge`` as a user runs it: a LoRA run merges into a folder that plain transformers loads directly
(``from_pretrained(OUT)``, model and tokenizer) with the run's logits; tuneforge's recipe sits beside the HF files
so predict reads it like the run, and folders merged in the older layout (``OUT/model/``) still read; a prefix run
is refused with exit 2 and the reason, and ``--export`` writes a self-contained folder that ``predict`` reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_rows, write_csv
from tuneforge.config import load_config
from tuneforge.export import merge_run
from tuneforge.inference import predict_texts
from tuneforge.methods.saved import read_manifest
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import train

pytestmark = pytest.mark.e2e

TEXTS = ["a great movie and fun", "i hated the film a lot", "the show was on tv", "good"]



@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("TUNEFORGE_TEST_THREADS", "1"))
    env.pop("TUNEFORGE_DEBUG", None)
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], env=_env(), capture_output=True, text=True,
                          timeout=600)


def _train(tmp_path: Path, method: str) -> Path:
    data = write_csv(tmp_path / "train.csv", make_rows(30))
    out = tmp_path / f"run-{method}"
    train(load_config(None, ["model=tiny-bert", f"method={method}", f"data.train={data}", "train.batch_size=8",
                             "train.max_steps=3", "train.precision=fp32", "train.tensorboard=false",
                             f"output_dir={out}"]), quiet=True)
    return out


def test_merge_lora_loads_in_plain_transformers(tmp_path: Path) -> None:
    run = _train(tmp_path, "lora")
    out = tmp_path / "merged"
    proc = _cli("merge", str(run), str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"merged 'lora' into {out} " in proc.stdout
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "labels.json", "tokenizer.json", "config.yaml", "merge.json"} <= files
    assert not files & {"model", "adapter_config.json", "adapter_model.safetensors", "tuneforge_method.json"}
    assert json.loads((out / "merge.json").read_text())["probe_max_abs_logit_diff"] < 1e-4

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()  # the folder itself, no subfolder
    tok = AutoTokenizer.from_pretrained(out)
    built = ClassificationObjective(load_config(run / "config.yaml")).from_saved(run / "model")  # unmerged, via peft
    with torch.no_grad():
        merged_logits = plain(**tok(TEXTS, padding=True, return_tensors="pt")).logits
        unmerged = built.model(**built.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(merged_logits, unmerged, atol=1e-4, rtol=0)
    # and the merged folder is a run-like directory for predict
    as_run = predict_texts(run, TEXTS, None, [])
    as_merged = predict_texts(out, TEXTS, None, [])
    assert [r["label"] for r in as_merged] == [r["label"] for r in as_run]
    for a, b in zip(as_run, as_merged, strict=True):
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a if k.startswith("p_"))
    # a folder merged before the flat layout (HF files under OUT/model/) still reads
    old = tmp_path / "merged-old"
    (old / "model").mkdir(parents=True)
    for f in out.iterdir():
        f.rename((old / f.name) if f.name in ("config.yaml", "merge.json") else (old / "model" / f.name))
    assert predict_texts(old, TEXTS, None, []) == as_merged


def test_merge_refuses_prefix_and_exports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tuneforge.cli import main

    run = _train(tmp_path, "prefix")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["tuneforge", "merge", str(run), str(out)])  # the console entry point,
    with pytest.raises(SystemExit) as exit_info:  # in-process: one CLI subprocess per file is enough
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "method 'prefix' cannot be merged into plain weights: prefix key/values are extra attention inputs" in err
    assert "--export" in err
    assert not out.exists()

    res = merge_run(run, out, export=True)
    assert res.kind == "exported"
    manifest = read_manifest(out)
    assert manifest["base_model"] == str((out / "base").resolve())
    assert (out / "base" / "model.safetensors").is_file()
    assert predict_texts(out, TEXTS, None, []) == predict_texts(run, TEXTS, None, [])


def test_merge_copies_a_plain_run(tmp_path: Path) -> None:
    run = _train(tmp_path, "full")
    res = merge_run(run, tmp_path / "out")
    assert res.kind == "copied"
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")  # plain weights load as they are
    assert predict_texts(tmp_path / "out", TEXTS, None, []) == predict_texts(run, TEXTS, None, [])
