"""Every registered method x ``task: dpo`` / ``simpo`` / ``kto`` (tiny-llama; bitfit on tiny-gpt2, which has
biases) and x ``task: reward`` (tiny-bert): train a few steps, save, and re-evaluate the saved run with `tuneforge.inference.evaluate_file`;
it must reproduce the run's final validation metrics (for DPO: with the base model reloaded as the reference).

Methods are read from `tuneforge.methods.METHODS` at collection time, so a method registered later joins.
Refused by design (a `ConfigError` before the run directory exists): ``frozen`` on DPO (it trains a separate task
head only; a causal LM's head is its pretrained output layer; the same for simpo and kto), ``frozen`` with its default feature cache on
reward (features are cached only for objectives declaring ``feature_head``; ``cache_features=false`` trains).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_preference_data import synthetic_pairs, synthetic_unpaired, write_jsonl

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.inference import evaluate_file
from tuneforge.methods import METHODS, get_method
from tuneforge.pipeline import train

STEPS = 3
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
MODEL = {"bitfit": "tiny-gpt2"}
LM_TASKS = ("dpo", "simpo", "kto")
REFUSED = {**{(t, "frozen"): "trains only a task head" for t in LM_TASKS}, ("reward", "frozen"): "cache_features=false"}
EXTRA = {"frozen-nocache": ["method=frozen", "method.cache_features=false"]}
CASES = [(t, m) for t in LM_TASKS for m in sorted(METHODS)] + [("reward", m) for m in [*sorted(METHODS), *EXTRA]]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("pref-matrix")
    pairs = (write_jsonl(root / "train.jsonl", synthetic_pairs(16, seed=0)),
             write_jsonl(root / "val.jsonl", synthetic_pairs(8, seed=1)))
    unpaired = (write_jsonl(root / "kto.jsonl", synthetic_unpaired(16, seed=0)),
                write_jsonl(root / "kto_val.jsonl", synthetic_unpaired(8, seed=1)))
    return {"kto": unpaired, "dpo": pairs, "simpo": pairs, "reward": pairs}


@pytest.mark.parametrize(("task", "case"), CASES, ids=[f"{t}-{c}" for t, c in CASES])
def test_method_trains_saves_and_reevaluates(task: str, case: str, files, tmp_path: Path) -> None:
    pairs = files[task]
    if case == "qlora" and not HAS_BNB:
        pytest.skip("qlora needs bitsandbytes")
    method = EXTRA.get(case, [f"method={case}"])
    name = method[0].split("=", 1)[1]
    model = "tiny-bert" if task == "reward" else MODEL.get(name, "tiny-llama")
    lr = max(get_method(name).config.default_lr, 5e-3)
    out = tmp_path / "run"
    overrides = [f"model={model}", f"task={task}", *method, f"data.train={pairs[0]}", f"data.validation={pairs[1]}",
                 "data.max_length=48", "train.batch_size=8", f"train.max_steps={STEPS}", "train.warmup_steps=0",
                 "train.schedule=constant", f"train.lr={lr}", "train.precision=fp32", "train.tensorboard=false",
                 "train.seed=0", f"output_dir={out}"]
    if (task, case) in REFUSED:
        with pytest.raises((ConfigError, ValueError), match=REFUSED[(task, case)]):
            train(load_config(None, overrides), quiet=True)
        assert not out.exists()
        return
    res = train(load_config(None, overrides), quiet=True)
    assert res.metrics["train"]["steps"] == STEPS
    final = res.metrics["splits"]["validation"]
    flat = evaluate_file(out, pairs[1], [])
    key = "reward_accuracy" if task in LM_TASKS else "accuracy"
    assert flat[key] == pytest.approx(final[key], abs=1e-6)
    assert flat["loss"] == pytest.approx(final["loss"], rel=1e-4, abs=1e-5)
