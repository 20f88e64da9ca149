"""Every registered method x ``task: seq2seq`` on a tiny T5 and a tiny BERT2BERT (warm-started from the tiny BERT).

For each (method, model) the real pipeline trains a few fp32 steps on a toy word-for-word translation with
``train.eval_on_start=true``, then:

* the held-out loss after training is at least ``MIN_DROP`` under the untrained model's;
* the final evaluation generates (beam search through the method's wrapper) and reports BLEU and ROUGE;
* `tuneforge.inference.evaluate_file` on the saved run directory reproduces the final loss and BLEU
  (whatever the method saved, it reloads over the same base: for BERT2BERT, the cached warm start).

Combinations that cannot work are asserted to raise the documented `ConfigError` (``REFUSED``) before any
weights load. Methods come from `tuneforge.methods.METHODS` at collection time, so a new one joins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_seq2seq import toy_rows, write_jsonl

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.inference import evaluate_file
from tuneforge.methods import METHODS, get_method
from tuneforge.pipeline import train
from tuneforge.track import read_metrics

MODELS = {"tiny-t5": ("model=tiny-t5",), "tiny-bert2bert": ("model=tiny-bert", "model.architecture=bert2bert")}
STEPS = 10
REFUSED: dict[tuple[str, str], str] = {
    ("bitfit", "tiny-t5"): "has none in its backbone",  # T5 has bias-free linear layers and norms
    **{("frozen", m): "'frozen' trains only a task head" for m in MODELS},
    # peft's prompt learning reads one layer count / hidden size from the config, which an EncoderDecoderModel's
    # lacks (refused when the method is applied, before the run directory exists)
    **{(m, "tiny-bert2bert"): "does not work with the 'encoder-decoder' architecture"
       for m in ("prefix", "prompt", "ptuning_v2")},
}
LR = {"full": 3e-3, "partial": 3e-3, "adapter": 1e-2, "bitfit": 1e-2, "lora": 1e-2, "qlora": 1e-2, "ia3": 1e-1,
      "prefix": 3e-1, "ptuning_v2": 1e-1, "prompt": 3e-1, "qat": 3e-3}
OPTIONS: dict[str, tuple[str, ...]] = {"partial": ("method.freeze_layers=1",)}
MIN_DROP = 0.02
# a soft prompt (or prefix) can only move a random tiny T5's encoder output a little in a few steps
SMALL_DROP = {("prompt", "tiny-t5"): 0.002, ("prefix", "tiny-t5"): 0.005, ("ptuning_v2", "tiny-t5"): 0.005}

CASES = [(m, model) for m in sorted(METHODS) for model in MODELS]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("seq2seq-matrix")
    return write_jsonl(d / "train.jsonl", toy_rows(96, 0)), write_jsonl(d / "val.jsonl", toy_rows(12, 1))


def _overrides(method: str, model: str, train_file: Path, val_file: Path, out: Path) -> list[str]:
    lr = LR.get(method, get_method(method).config.default_lr)
    return [*MODELS[model], "task=seq2seq", f"method={method}", f"data.train={train_file}",
            f"data.validation={val_file}", "data.max_length=16", "task.max_target_length=16", "task.num_beams=2",
            "task.max_new_tokens=6", "train.batch_size=8", f"train.max_steps={STEPS}", "train.warmup_steps=0",
            "train.schedule=constant", f"train.lr={lr}", "train.precision=fp32", "train.tensorboard=false",
            "train.eval_on_start=true", "train.seed=0", f"output_dir={out}", *OPTIONS.get(method, ())]


@pytest.mark.parametrize(("method", "model"), CASES, ids=[f"{m}-{x}" for m, x in CASES])
def test_method_seq2seq(method: str, model: str, files: tuple[Path, Path], tmp_path: Path) -> None:
    train_file, val_file = files
    overrides = _overrides(method, model, train_file, val_file, tmp_path / "run")
    if (method, model) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(method, model)]) as info:
            cfg = load_config(None, overrides)
            train(cfg, quiet=True)
        assert info.value.key in ("method", "method.name")
        assert not (tmp_path / "run").exists()
        return

    res = train(load_config(None, overrides), quiet=True)
    val = res.metrics["splits"]["validation"]
    evals = [r for r in read_metrics(res.run_dir) if r.get("split") == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    assert val["loss"] < evals[0]["loss"] - SMALL_DROP.get((method, model), MIN_DROP), [r["loss"] for r in evals]
    assert 0.0 <= val["bleu"] <= 100.0 and 0.0 <= val["rouge1"] <= 1.0 and val["generated"] == 12
    again = evaluate_file(res.run_dir, val_file, [])
    assert again["loss"] == pytest.approx(val["loss"], abs=1e-4)
    assert again["bleu"] == pytest.approx(val["bleu"], abs=1e-6)
    saved = json.loads((res.run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert saved["splits"]["validation"]["bleu_signature"].startswith("nrefs:1|")
