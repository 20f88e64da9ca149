"""The seams: an objective, a run extension and a loop shape added from outside `src/`, one registration line
each, and trained with; registries refuse a second registration; capabilities, not names, drive callers.

The toy pieces live in this module (imported by the SIGKILL resume test's child process too):

* ``toy_regression``: sentence regression (MSE on a one-output head over tiny-bert), a new objective;
* ``toy_l2sp``: an extension adding ``weight * sum((p - p0)^2)`` over the trainable parameters, with ``p0``
  the weights when training started, kept in checkpoints (L2-SP's shape, Li et al. 2018);
* ``one_batch``: a loop that takes ``train.max_steps`` steps on the first batch only, reusing the engine
  pieces (stepper, eval tracker, checkpoints).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tuneforge.config import ExtensionConfig, TaskConfig, load_config
from tuneforge.data.batching import TokenBatches
from tuneforge.data.tokenize import tokenize_texts
from tuneforge.engine.loops import FitResult, LoopBase, LoopContext
from tuneforge.engine.loops import register as register_loop
from tuneforge.extensions import Extension, ExtensionSpec
from tuneforge.extensions import register as register_extension
from tuneforge.objectives import Built, ObjectiveSpec, TaskData
from tuneforge.objectives import register as register_objective
from tuneforge.objectives.base import eval_batches
from tuneforge.registry import EXTENSIONS, LOOPS, OBJECTIVES

# --------------------------------------------------------------------------- a toy objective


class ToyRegressionConfig(TaskConfig):
    name: Literal["toy_regression", "toy_regression_one_batch"] = "toy_regression"


class ToyRegression:
    """Regress a number from a sentence: MSE of a one-output sequence head."""

    name = "toy_regression"
    default_metric = "loss"
    greater_is_better = False

    def __init__(self, run: Any):
        self.run = run

    def _read(self, path: Path) -> dict[str, list]:
        with Path(path).open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return {"texts": [r["text"] for r in rows], "y": [float(r["y"]) for r in rows]}

    def load_data(self, run: Any) -> TaskData:
        return TaskData({"train": self._read(run.data.train), "validation": self._read(run.data.validation)})

    def build(self, run: Any, model_path: Path, data: TaskData) -> Built:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model, info = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                                         output_loading_info=True)
        return Built(model, AutoTokenizer.from_pretrained(model_path), sorted(info["missing_keys"]))

    def prepare(self, records: dict, tokenizer: Any, run: Any) -> TokenBatches:
        enc = tokenize_texts(tokenizer, records["texts"], None, max_length=32, keep_token_types=False)
        enc["labels"] = records["y"]
        return TokenBatches(enc, tokenizer.pad_token_id, group_by_length=False)

    def forward(self, model: nn.Module, batch: dict) -> Any:
        return model(**{k: v for k, v in batch.items() if k != "labels"})

    def loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        return F.mse_loss(outputs.logits.float().squeeze(-1), batch["labels"].float())

    def evaluate(self, model: nn.Module, data: Any, *, batch_size: int, runtime: Any) -> dict[str, Any]:
        total, n = 0.0, 0
        for _, batch in eval_batches(model, data, batch_size, runtime):
            total += float(self.loss(self.forward(model, batch), batch)) * len(batch["labels"])
            n += len(batch["labels"])
        return {"loss": total / n}

    def save_artifacts(self, out_dir: Path, data: TaskData) -> None:
        pass

    def from_saved(self, model_dir: Path) -> Built:
        raise NotImplementedError

    def read_split(self, path: Path) -> dict:
        return self._read(path)

    def baseline_metrics(self, train: dict, records: dict) -> dict[str, float]:
        mean = sum(train["y"]) / len(train["y"])
        return {"mean_baseline_loss": sum((y - mean) ** 2 for y in records["y"]) / len(records["y"])}


OBJECTIVE = ToyRegression

# --------------------------------------------------------------------------- a toy extension


class ToyL2spConfig(ExtensionConfig):
    name: Literal["toy_l2sp"] = "toy_l2sp"
    weight: float = Field(0.1, ge=0)


class ToyL2sp(Extension):
    """``weight * sum((p - p0)^2)``; ``p0`` taken when training starts and kept in checkpoints."""

    def __init__(self, weight: float):
        self.weight = weight
        self.p0: dict[str, torch.Tensor] = {}
        self.evals: list[int] = []

    def on_train_start(self, ctx: Any) -> None:
        if not self.p0:  # a resumed run restored it from the checkpoint
            self.p0 = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}

    def extra_loss(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor:
        params = dict(model.named_parameters())
        return self.weight * sum(((params[n] - p0) ** 2).sum() for n, p0 in self.p0.items())

    def on_eval(self, step: int, metrics: dict) -> None:
        self.evals.append(step)

    def on_end(self, ctx: Any) -> dict[str, Any]:
        params = dict(ctx.model.named_parameters())
        return {"distance": float(sum(((params[n] - p0) ** 2).sum() for n, p0 in self.p0.items()).sqrt())}

    def report_section(self, block: dict | None) -> str | None:
        return f"## Toy L2-SP\n\ndistance from start: {block['distance']:.6f}\n"

    def state_dict(self) -> dict[str, Any]:
        return {"p0": self.p0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p0 = state["p0"]


LAST: dict[str, ToyL2sp] = {}


def create(run: Any, cfg: ToyL2spConfig, objective: Any, data: Any, listed: bool) -> ToyL2sp | None:
    if not listed:
        return None
    LAST["ext"] = ToyL2sp(cfg.weight)
    return LAST["ext"]


# --------------------------------------------------------------------------- a toy loop


class OneBatchLoop(LoopBase):
    """``train.max_steps`` steps on the first batch only (overfitting it), then one evaluation."""

    def __init__(self, ctx: LoopContext):
        self.total_steps = self.steps_per_epoch = ctx.cfg.max_steps or 1
        super().__init__(ctx)
        self.losses: list[float] = []

    def fit(self) -> FitResult:
        first = self.train_data.plan(0, self.cfg.batch_size, seed=0, shuffle=False)[0]
        batch = self.runtime.to_device(self.train_data.collate(first))
        self.module.train()
        while self.state.step < self.total_steps:
            with self.runtime.autocast():
                loss = self.compute_loss(batch)
            self.stepper.backward(loss, 1)
            self.stepper.step(self.state, True)
            self.losses.append(float(loss))
            self.state.step += 1
            self.logger.log(self.state.step, "train", {"loss": self.losses[-1]})
        self.evaluate()
        self.checkpoint()
        LAST["loop"] = self
        return FitResult(self.state, self.best_checkpoint(), self.last_eval)


# --------------------------------------------------------------------------- one line each
def register_toys() -> None:
    """The registration lines (idempotent for tests that import this module twice)."""
    if "toy_regression" not in OBJECTIVES:
        register_objective(ObjectiveSpec("toy_regression", ToyRegressionConfig, __name__))
        register_objective(ObjectiveSpec("toy_regression_one_batch", ToyRegressionConfig, __name__, loop="one_batch"))
        register_extension(ExtensionSpec("toy_l2sp", ToyL2spConfig, __name__))
        register_loop("one_batch", OneBatchLoop)


register_toys()


# --------------------------------------------------------------------------- the tests
def write_regression(path: Path, n: int, offset: int = 0) -> Path:
    words = ["tiny", "small", "medium", "large", "huge"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "y"])
        for i in range(offset, offset + n):
            k = i % len(words)
            w.writerow([f"a {words[k]} thing number {i % 7}", float(k)])
    return path


@pytest.fixture()
def regression_data(tmp_path: Path) -> tuple[Path, Path]:
    return write_regression(tmp_path / "train.csv", 80), write_regression(tmp_path / "val.csv", 20, offset=80)


def _overrides(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["model=tiny-bert", "task=toy_regression", f"data.train={data[0]}", f"data.validation={data[1]}",
            "train.batch_size=8", "train.lr=3e-3", "train.max_grad_norm=0", "train.precision=fp32", "train.tensorboard=false",
            "train.eval_on_start=true", f"output_dir={out}", *extra]


def test_toy_objective_trains_through_the_pipeline(tmp_path: Path, regression_data) -> None:
    from tuneforge.pipeline import train

    res = train(load_config(None, _overrides(regression_data, tmp_path / "run", "train.epochs=15")), quiet=True)
    history = res.metrics["train"]
    evals = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in evals if r["split"] == "eval"]
    assert losses[-1] < 0.5 * losses[0], losses  # it learns the word -> number map
    val = res.metrics["splits"]["validation"]
    assert val["loss"] < val["mean_baseline_loss"]  # and beats predicting the mean
    assert history["steps"] == 150


def test_toy_extension_adds_its_term_keeps_state_and_reports(tmp_path: Path, regression_data) -> None:
    from tuneforge.pipeline import train

    base = train(load_config(None, _overrides(regression_data, tmp_path / "plain", "train.max_steps=20",
                                               "train.eval_steps=10")), quiet=True)
    assert "toy_l2sp" not in base.metrics  # not listed: not active
    cfg = load_config(None, _overrides(regression_data, tmp_path / "l2", "train.max_steps=20", "train.eval_steps=10",
                                       "extensions=[{name: toy_l2sp, weight: 10.0}]"))
    held = train(cfg, quiet=True)
    ext = LAST["ext"]
    assert ext.evals == [0, 10, 20]  # on_eval after the baseline and each evaluation
    # the term pulls the weights back towards where they started
    assert held.metrics["toy_l2sp"]["distance"] < 0.5 * _distance(tmp_path / "plain", ext.p0)
    assert "## Toy L2-SP" in (held.run_dir / "report.md").read_text()
    # its state is in every checkpoint
    extra = torch.load(held.run_dir / "checkpoints" / "step-00000020" / "extra.pt", weights_only=False)
    assert set(extra["extensions"]["toy_l2sp"]["p0"]) == set(ext.p0)


def _distance(run_dir: Path, p0: dict[str, torch.Tensor]) -> float:
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "checkpoints" / "step-00000020" / "trainable.safetensors"))
    return float(sum(((final[n] - v) ** 2).sum() for n, v in p0.items()).sqrt())


def test_toy_loop_runs_with_the_engine_pieces(tmp_path: Path, regression_data) -> None:
    from tuneforge.pipeline import train

    res = train(load_config(None, _overrides(regression_data, tmp_path / "run", "task=toy_regression_one_batch",
                                             "train.max_steps=40")), quiet=True)
    loop = LAST["loop"]
    assert res.metrics["train"]["steps"] == 40 and len(loop.losses) == 40
    assert loop.losses[-1] < 0.45 * loop.losses[0], loop.losses[::5]  # it fits the one batch (from the mean-free start)
    assert (res.run_dir / "checkpoints" / "step-00000040" / "trainable.safetensors").is_file()
    assert (res.run_dir / "model" / "model.safetensors").is_file()


def test_second_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_objective(ObjectiveSpec("toy_regression", ToyRegressionConfig, __name__))
    with pytest.raises(ValueError, match="already registered"):
        register_extension(ExtensionSpec("toy_l2sp", ToyL2spConfig, __name__))
    with pytest.raises(ValueError, match="already registered"):
        register_loop("supervised", OneBatchLoop)
    from tuneforge.methods import MethodSpec, register

    with pytest.raises(ValueError, match="already registered"):
        register(MethodSpec("lora", ToyL2spConfig, "x"))  # type: ignore[arg-type]
    assert {"toy_l2sp", "forgetting", "samples"} <= set(EXTENSIONS) and "one_batch" in LOOPS


def test_unknown_extension_and_duplicate_listing_are_config_errors() -> None:
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown extension 'nope'; allowed: .*forgetting"):
        load_config(None, ["extensions=[{name: nope}]"])
    with pytest.raises(ConfigError, match="listed more than once"):
        load_config(None, ["extensions=[toy_l2sp, toy_l2sp]"])
    with pytest.raises(ConfigError, match="weight"):
        load_config(None, ["extensions=[{name: toy_l2sp, weight: -1}]"])
    with pytest.raises(ConfigError, match="does not generate text"):
        from tuneforge.extensions import create_extensions
        from tuneforge.objectives import get_objective

        run = load_config(None, ["extensions=[samples]"])
        create_extensions(run, get_objective(run), None)


def test_no_name_comparisons_or_getattr_capabilities_in_src() -> None:
    """The acceptance greps: capabilities are declared, never probed with getattr or compared by name."""
    import re

    src = Path(__file__).resolve().parents[2] / "src" / "tuneforge"
    names = {"classification", "clm", "sft", "mlm", "span_corruption", "full", "frozen", "partial", "lora", "qlora",
             "ia3", "prefix", "prompt", "ptuning_v2", "bitfit", "adapter"}
    pattern = re.compile(r"(task|method)(\.name)?\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[{\"']")
    found = []
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found += [f"{path.name}: getattr" for _ in re.finditer(r"getattr\((objective|runtime|method)\b", text)]
        if path.parent.name not in ("objectives", "methods") and path.parent.parent.name != "methods":
            for line in text.splitlines():
                if pattern.search(line) and any(f'"{n}"' in line for n in names):
                    found.append(f"{path.name}: {line.strip()}")
    assert not found, found
