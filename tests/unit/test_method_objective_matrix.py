"""Every registered method × the language-modelling objectives beyond sft: clm, mlm and span_corruption.

`test_method_matrix` covers classification and `test_lm_objectives` covers sft; this file covers the rest
(``frozen`` aside: it trains a task head on cached features, and these objectives have none, so it is
refused at config validation, which is asserted here). Methods are read from `tuneforge.methods.METHODS`
at collection time, so a method registered later joins automatically.

For each (method, objective, model) the real pipeline trains a few fp32 steps on tiny repetitive text with
``train.eval_on_start=true``, then:

* the held-out loss after training is at least ``MIN_DROP`` under the untrained model's (the step-0 evaluation);
* `tuneforge.inference.evaluate_file` on the saved run directory reproduces the final validation loss
  (evaluation masks and spans are seeded, so mlm and span_corruption are deterministic too).

Combinations that cannot work are asserted to raise the documented `ConfigError` at config validation
(``REFUSED``), before any weights load or the run directory exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.inference import evaluate_file
from tuneforge.methods import METHODS, get_method
from tuneforge.pipeline import train
from tuneforge.track import read_metrics

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "slept", "in", "sun"]

# objective -> the tiny models it trains
MODELS: dict[str, tuple[str, ...]] = {
    "clm": ("tiny-gpt2", "tiny-llama"),
    "mlm": ("tiny-bert",),
    "span_corruption": ("tiny-t5",),
}
STEPS = 12

# (method, task, model) -> text of the documented ConfigError, raised by config validation (`load_config`).
REFUSED: dict[tuple[str, str, str], str] = {
    # Llama and T5 have bias-free linear layers and norms: nothing for BitFit to train
    ("bitfit", "clm", "tiny-llama"): "has none in its backbone",
    ("bitfit", "span_corruption", "tiny-t5"): "has none in its backbone",
    # peft has prompt-learning wrappers for classification, QA, causal and seq2seq LMs, not masked LMs
    **{(m, "mlm", "tiny-bert"): "peft has none for masked language models" for m in ("prefix", "prompt", "ptuning_v2")},
    # torchao's QAT swaps nn.Linear layers; GPT-2's are transformers Conv1D
    ("qat", "clm", "tiny-gpt2"): "Conv1D layers are not nn.Linear",
}

# Learning rates large enough that STEPS steps visibly lower the held-out loss of the (random) tiny models.
# The methods' defaults suit longer runs (full and partial default to 5e-5); ia3 diverges on tiny-bert at 3e-1.
LR: dict[str, float] = {
    "full": 3e-3, "partial": 3e-3, "adapter": 1e-2, "bitfit": 3e-3, "lora": 1e-2, "qlora": 1e-2, "ia3": 1e-1,
    "prefix": 3e-1, "ptuning_v2": 1e-1, "prompt": 3e-1, "qat": 3e-3,
}  # prefix: its reparameterisation MLP trains at 0.03 of the rate (`lr_scales`), 9e-3 here
# Method options beyond the defaults: partial's default freeze_layers=2 freezes both tiny blocks (and the
# embeddings, which tied LM heads share), leaving only the final norm to train.
OPTIONS: dict[str, tuple[str, ...]] = {"partial": ("method.freeze_layers=1",)}
# The least drop of held-out loss (nats) after STEPS steps. A soft prompt can only move a random tiny T5's
# encoder output: it levels off ~0.006 under the untrained loss whatever the learning rate or length.
MIN_DROP = 0.02
SMALL_DROP: dict[tuple[str, str], float] = {("prompt", "tiny-t5"): 0.003}

CASES = [(m, task, model) for m in sorted(METHODS) if m != "frozen" for task, models in MODELS.items()
         for model in models]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def _sentence(i: int) -> str:
    return " ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1, 9)) + "."


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Five sentences repeated: 120 training lines, 10 validation lines (the same five sentences)."""
    root = tmp_path_factory.mktemp("lm-matrix-data")
    train_file, val_file = root / "train.txt", root / "val.txt"
    train_file.write_text("\n".join(_sentence(i % 5) for i in range(120)) + "\n", encoding="utf-8")
    val_file.write_text("\n".join(_sentence(i % 5) for i in range(10)) + "\n", encoding="utf-8")
    return train_file, val_file


def _overrides(method: str, task: str, model: str, train_file: Path, val_file: Path, out: Path) -> list[str]:
    lr = LR.get(method, get_method(method).config.default_lr)  # a method registered later starts at its default
    return [
        f"model={model}", f"task={task}", f"method={method}", f"data.train={train_file}",
        f"data.validation={val_file}", "data.max_length=32", "train.batch_size=8", f"train.max_steps={STEPS}",
        "train.warmup_steps=0", "train.schedule=constant", f"train.lr={lr}", "train.precision=fp32",
        "train.tensorboard=false", "train.eval_on_start=true", "train.seed=0", f"output_dir={out}",
        *OPTIONS.get(method, ()),
    ]


@pytest.mark.parametrize(("method", "task", "model"), CASES, ids=[f"{m}-{t}-{x}" for m, t, x in CASES])
def test_method_objective(method: str, task: str, model: str, text_files: tuple[Path, Path], tmp_path: Path) -> None:
    train_file, val_file = text_files
    out = tmp_path / "run"
    overrides = _overrides(method, task, model, train_file, val_file, out)

    if (method, task, model) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(method, task, model)]) as info:
            load_config(None, overrides)
        assert info.value.key in ("method", "method.name")
        assert f"'{method}'" in str(info.value)
        return

    res = train(load_config(None, overrides), quiet=True)
    assert res.metrics["train"]["steps"] == STEPS
    final = res.metrics["splits"]["validation"]["loss"]
    evals = [r for r in read_metrics(res.run_dir) if r.get("split") == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS  # eval_on_start: step 0 is the untrained model
    # train.load_best_at_end: the final model is the best evaluated checkpoint (step 0 is never chosen)
    assert min(r["loss"] for r in evals[1:]) == pytest.approx(final, abs=1e-6)
    untrained = evals[0]["loss"]
    assert final < untrained - SMALL_DROP.get((method, model), MIN_DROP), [(r["step"], r["loss"]) for r in evals]
    # the saved run directory reloads (whatever the method saved) and evaluates to the same loss
    again = evaluate_file(res.run_dir, val_file, [])
    assert again["loss"] == pytest.approx(final, abs=1e-4)


@pytest.mark.parametrize("task", sorted(MODELS))
def test_frozen_is_refused(task: str) -> None:
    """'frozen' trains a task head on cached features; these objectives predict tokens through the whole model."""
    with pytest.raises(ConfigError, match="'frozen' trains") as info:
        load_config(None, [f"task={task}", f"model={MODELS[task][0]}", "method=frozen"])
    assert info.value.key == "method.name"
