"""The shared method test matrix: every registered method × three tiny model families × classification.

Methods are read from `tuneforge.methods.METHODS` at collection time, so a method registered later joins
automatically. For each combination the real pipeline trains 5 steps on one fixed batch of 8 rows, then:

* the loss drops (first vs last logged step; seed pinned);
* only the intended parameters change: whatever the method leaves frozen is bit-identical to the base, and
  (for methods listed in ``INTENDED``) the trainable set is exactly the method's;
* save -> ``load_trained`` reproduces the trained model's logits (to 1e-6: float rounding);
* merge parity: merged and unmerged logits agree within 1e-4 where the method merges; otherwise the method
  says why (``merge_unsupported``) or saved a plain transformers folder (nothing to merge).

Combinations refused by design are asserted to raise the documented `ConfigError` (``REFUSED``). A new
method adds its row to ``INTENDED`` (and ``REFUSED`` if it refuses an architecture).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_rows, write_csv
from tuneforge.config import load_config
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError
from tuneforge.methods import METHODS, get_method
from tuneforge.methods.saved import load_trained, read_manifest
from tuneforge.models.anatomy import param_depth
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import train

MODELS = ("tiny-bert", "tiny-llama", "tiny-gpt2")
STEPS = 5

# (method, model) -> text of the documented ConfigError (raised at config validation, key 'method').
REFUSED: dict[tuple[str, str], str] = {
    ("bitfit", "tiny-llama"): "has none in its backbone",
    ("qat", "tiny-gpt2"): "Conv1D layers are not nn.Linear",  # torchao's QAT swaps nn.Linear only
}

# method -> (parameter name, head parameter names) -> whether the method trains it.
INTENDED: dict[str, Callable[[str, set[str]], bool]] = {
    "full": lambda n, head: True,
    "frozen": lambda n, head: n in head,
    # default freeze_layers=2 freezes both tiny blocks and the embeddings: the top (final norm, pooler) trains
    "partial": lambda n, head: n in head or param_depth(n, 2) == 3,
    "adapter": lambda n, head: n in head or ".bottleneck_adapters." in n,
    "bitfit": lambda n, head: n in head or n.endswith(".bias"),
    "lora": lambda n, head: ".lora_" in n or ".modules_to_save." in n,
    "qlora": lambda n, head: ".lora_" in n or ".modules_to_save." in n,
    "ia3": lambda n, head: ".ia3_" in n or ".modules_to_save." in n,
    "prefix": lambda n, head: n.startswith("prompt_encoder.") or ".modules_to_save." in n,
    "ptuning_v2": lambda n, head: n.startswith("prompt_encoder.") or ".modules_to_save." in n,
    "prompt": lambda n, head: n.startswith("prompt_encoder.") or ".modules_to_save." in n,
    "qat": lambda n, head: True,
}

# method -> merge-parity tolerance where merged weights cannot compute exactly as the method does. QAT: the
# merged model holds the dequantised int weights in plain fp32 layers, so activations are no longer rounded
# to int8 (measured up to 1.1e-3 on tiny-llama).
MERGE_ATOL: dict[str, float] = {"qat": 1e-2}

CASES = [(m, model) for m in sorted(METHODS) for model in MODELS]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 training rows (one fixed batch) and 32 validation rows: 40 rows of 3 classes."""
    rows = make_rows(40)
    root = tmp_path_factory.mktemp("matrix-data")
    return write_csv(root / "train.csv", rows[:8]), write_csv(root / "val.csv", rows[8:])


class Capture:
    model: nn.Module
    head: set[str]
    initial: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]


def _install_capture(method: str, monkeypatch: pytest.MonkeyPatch) -> Capture:
    cap = Capture()
    module = importlib.import_module(get_method(method).module)
    real_apply = module.apply

    def apply(model, run, ctx):
        cap.head = set(ctx.head_names)  # before the method may rewrite ctx (peft renames the head)
        model = real_apply(model, run, ctx)
        cap.model = model
        cap.initial = {k: v.detach().clone() for k, v in model.named_parameters()}
        cap.requires_grad = {k: v.requires_grad for k, v in model.named_parameters()}
        return model

    monkeypatch.setattr(module, "METHOD", dataclasses.replace(module.METHOD, apply=apply))
    return cap


def _overrides(method: str, model: str, train_csv: Path, val_csv: Path, out: Path) -> list[str]:
    lr = max(get_method(method).config.default_lr, 5e-3)  # 5 steps must move even the slowest method
    return [
        f"model={model}", f"method={method}", f"data.train={train_csv}", f"data.validation={val_csv}",
        "train.batch_size=8", f"train.max_steps={STEPS}", "train.log_steps=1", "train.warmup_steps=0",
        "train.schedule=constant", f"train.lr={lr}", "train.precision=fp32", "train.tensorboard=false",
        "train.seed=0", f"output_dir={out}",
    ]


def _logits(model: nn.Module, obj: ClassificationObjective, batches) -> torch.Tensor:
    out, _ = obj.logits(model, batches, batch_size=32, runtime=Runtime.cpu())
    return out


@pytest.mark.parametrize(("method", "model"), CASES, ids=[f"{m}-{x}" for m, x in CASES])
def test_method(method: str, model: str, data: tuple[Path, Path], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> None:
    train_csv, val_csv = data
    out = tmp_path / "run"
    overrides = _overrides(method, model, train_csv, val_csv, out)

    if (method, model) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(method, model)]) as info:
            train(load_config(None, overrides), quiet=True)
        assert info.value.key == "method"
        assert not out.exists()  # refused before the run directory exists
        return

    cap = _install_capture(method, monkeypatch)
    res = train(load_config(None, overrides), quiet=True)
    assert res.metrics["train"]["steps"] == STEPS

    # -- the loss drops on the fixed batch
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train" and r.get("loss") is not None]
    assert len(losses) == STEPS
    assert min(losses[1:]) < losses[0], losses  # per-step losses carry dropout noise: the last may sit above

    # -- only the intended parameters change
    final = dict(cap.model.named_parameters())
    trainable = {n for n, rg in cap.requires_grad.items() if rg}
    changed = {n for n, v in cap.initial.items() if not torch.equal(final[n], v)}
    assert trainable, "the method trains nothing"
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert changed, "no parameter changed"
    if method in INTENDED:
        intended = {n for n in cap.initial if INTENDED[method](n, cap.head)}
        assert trainable == intended, (sorted(trainable ^ intended)[:8])

    # -- save -> load_trained reproduces the outputs
    from transformers import AutoModelForSequenceClassification

    obj = ClassificationObjective(load_config(out / "config.yaml"))
    obj.labels = json.loads((out / "model" / "labels.json").read_text())["labels"]
    built = obj.from_saved(out / "model")
    val = obj.read_split(val_csv)
    batches = obj.prepare(val, built.tokenizer, load_config(out / "config.yaml"))
    trained = _logits(cap.model, obj, batches)
    loaded = _logits(built.model, obj, batches)
    # to float rounding: the first-token last layer (`objectives.first_token`) runs [B, 1, H] matmuls, whose
    # kernel choice (and so rounding) can differ between two copies of the same weights (~1e-9 seen)
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=0)

    # -- merge parity, or the documented reason there is none
    runtime = get_method(method).runtime()
    if runtime.merge is not None:
        fresh = load_trained(AutoModelForSequenceClassification, out / "model", dtype=torch.float32)
        merged = runtime.merge(fresh)
        torch.testing.assert_close(_logits(merged, obj, batches), loaded, atol=MERGE_ATOL.get(method, 1e-4), rtol=0)
    elif runtime.save is not None:
        assert isinstance(runtime.merge_unsupported, str) and runtime.merge_unsupported
    else:  # saved as a plain transformers folder: nothing to merge
        assert read_manifest(out / "model") is None
