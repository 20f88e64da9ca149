"""Every registered method x token classification (tiny-bert): train a few steps, save, and re-evaluate the
saved run with `tuneforge.inference.evaluate_file`; it must reproduce the run's final validation f1 and loss.

Methods are read from `tuneforge.methods.METHODS` at collection time, so a method registered later joins.
Refused by design (``REFUSED``, a `ConfigError` before the run directory exists or before training):

* ``frozen`` with its default ``cache_features=true``: the frozen method caches backbone features only for
  objectives declaring ``ObjectiveSpec(feature_head=True)``; token classification does not (its head reads
  every token, the cache would hold [words, hidden] per sentence), so the error says to set
  ``method.cache_features=false``, and that setting is tested to train (``EXTRA``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_token_classification import make_sentences, write_conll, write_jsonl

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.inference import evaluate_file
from tuneforge.methods import METHODS, get_method
from tuneforge.pipeline import train

STEPS = 4

REFUSED: dict[str, str] = {
    "frozen": "has no feature cache; set method.cache_features=false",
}
EXTRA: dict[str, list[str]] = {"frozen-nocache": ["method=frozen", "method.cache_features=false"]}

CASES = sorted(METHODS) + sorted(EXTRA)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rows = make_sentences(40, seed=2)
    root = tmp_path_factory.mktemp("ner-matrix")
    return write_conll(root / "train.conll", rows[:16]), write_jsonl(root / "val.jsonl", rows[16:])


def _overrides(case: str, train_csv: Path, val: Path, out: Path) -> list[str]:
    method = EXTRA.get(case, [f"method={case}"])
    name = method[0].split("=", 1)[1]
    lr = max(get_method(name).config.default_lr, 5e-3)
    return [
        "model=tiny-bert", "task=token_classification", *method, f"data.train={train_csv}", f"data.validation={val}",
        "train.batch_size=8", f"train.max_steps={STEPS}", "train.log_steps=1", "train.warmup_steps=0",
        "train.schedule=constant", f"train.lr={lr}", "train.precision=fp32", "train.tensorboard=false",
        "train.seed=0", f"output_dir={out}",
    ]


@pytest.mark.parametrize("case", CASES)
def test_method_trains_saves_and_reevaluates(case: str, data: tuple[Path, Path], tmp_path: Path) -> None:
    train_file, val = data
    out = tmp_path / "run"
    run = load_config(None, _overrides(case, train_file, val, out))
    if case in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[case]) as info:
            train(run, quiet=True)
        assert info.value.key == "method"
        return
    res = train(run, quiet=True)
    assert res.metrics["train"]["steps"] == STEPS
    final = res.metrics["splits"]["validation"]
    flat = evaluate_file(out, val, [])
    assert flat["f1"] == pytest.approx(final["f1"], abs=1e-6)
    assert flat["loss"] == pytest.approx(final["loss"], rel=1e-4, abs=1e-5)
