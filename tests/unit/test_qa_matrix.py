"""Every registered method × extractive QA on tiny-bert: train a few steps, save, and check that
``tuneforge.inference.evaluate_file`` on the saved run reproduces the final validation F1 (and EM).

Methods are read from `tuneforge.methods.METHODS` at collection time, so a method registered later joins.
Refusals by design (``REFUSED``) must be a `ConfigError` at key ``method`` before the run directory exists:

* ``frozen`` at its default ``cache_features=true``: feature caching needs the objective to declare
  ``feature_head`` (a single pooled vector per example); QA reads every token's hidden state, so the error
  says to set ``method.cache_features=false``. With that setting frozen trains only ``qa_outputs`` (tested).
* ``prefix``, ``ptuning_v2`` and ``prompt`` run through peft's ``PeftModelForQuestionAnswering``; prompt
  tuning prepends its virtual tokens to the sequence, and the objective keeps only the last T logits so
  targets keep their indices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_extractive_qa import synthetic_rows, write_jsonl

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.inference import evaluate_file
from tuneforge.methods import METHODS, get_method
from tuneforge.pipeline import train

STEPS = 4
REFUSED: dict[str, str] = {"frozen": "method.cache_features=false"}
CASES = [*sorted(METHODS), "frozen-nocache"]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qa-matrix")
    return (write_jsonl(root / "train.jsonl", synthetic_rows(16, seed=1)),
            write_jsonl(root / "val.jsonl", synthetic_rows(24, seed=2)))


@pytest.mark.parametrize("case", CASES)
def test_qa_method(case: str, data: tuple[Path, Path], tmp_path: Path) -> None:
    method = case.removesuffix("-nocache")
    train_file, val_file = data
    out = tmp_path / "run"
    lr = max(get_method(method).config.default_lr, 5e-3)
    overrides = [
        "task=extractive_qa", "model=tiny-bert", f"method={method}", f"data.train={train_file}",
        f"data.validation={val_file}", "task.max_length=48", "task.doc_stride=8", "task.max_question_length=12",
        "train.batch_size=8", f"train.max_steps={STEPS}", "train.log_steps=1", "train.warmup_steps=0",
        "train.schedule=constant", f"train.lr={lr}", "train.precision=fp32", "train.tensorboard=false",
        "train.seed=0", f"output_dir={out}",
    ]
    if case.endswith("-nocache"):
        overrides.append("method.cache_features=false")
    elif method in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[method]) as info:
            train(load_config(None, overrides), quiet=True)
        assert info.value.key == "method"
        assert not (out / "model").exists()
        return
    res = train(load_config(None, overrides), quiet=True)
    assert res.metrics["train"]["steps"] == STEPS
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train" and r.get("loss") is not None]
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))
    final = res.metrics["splits"]["validation"]
    flat = evaluate_file(out, val_file, [])
    assert flat["f1"] == pytest.approx(final["f1"], abs=1e-6), (flat, final)
    assert flat["exact_match"] == pytest.approx(final["exact_match"], abs=1e-6)
    assert flat["loss"] == pytest.approx(final["loss"], rel=1e-4, abs=1e-5)
