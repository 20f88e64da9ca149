"""The engine: LLRD parameter groups, LR schedules, and the training loop (determinism, non-finite policy,
checkpoint rotation, early stopping, gradient accumulation, resume).

Loop tests here run the whole pipeline on tiny-bert (a few optimizer steps); `test_loop.py` runs the
supervised loop directly on a linear model over `TensorBatches`, where exact equalities can be asserted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import interrupt_after_checkpoint
from tuneforge.config import TrainConfig, load_config
from tuneforge.engine import (
    BF16_MIN_SPEEDUP,
    Runtime,
    build_optimizer,
    build_scheduler,
    cpu_bf16_speedup,
    cpu_has_bf16,
    lr_scale,
    param_groups,
    resolve_precision,
)
from tuneforge.engine.checkpoint import latest_checkpoint, list_checkpoints, load_trainable
from tuneforge.errors import TrainingError
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names, num_layers
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import RunResult, train
from tuneforge.track import read_metrics


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots are tested elsewhere; rendering them costs ~0.5 s per run."""
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def _run(tmp_path: Path, data: Path, *overrides: str, name: str = "run") -> RunResult:
    cfg = load_config(
        None,
        [
            "model=tiny-bert",
            f"data.train={data}",
            "train.batch_size=8",
            "train.precision=fp32",
            "train.log_steps=1",
            *overrides,
            f"output_dir={tmp_path / name}",
            "train.tensorboard=false",
        ],
    )
    return train(cfg, overwrite=True, quiet=True)


def _train_losses(run_dir: Path) -> list[tuple[int, float | None]]:
    return [(r["step"], r.get("loss")) for r in read_metrics(run_dir) if r["split"] == "train"]


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


EASY_ROWS = [("good great fun", "pos"), ("bad awful boring", "neg")] * 30


# --------------------------------------------------------------------------- LLRD and weight decay
def _tiny_bert_classifier(num_labels: int = 2) -> tuple[nn.Module, set[str], int]:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model("tiny-bert")
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, output_loading_info=True
    )
    return (
        model,
        head_parameter_names(model, info["missing_keys"]),
        num_layers(AutoConfig.from_pretrained(path)),
    )


def test_lr_scale_formula() -> None:
    # depth 0 = embeddings, k + 1 = block k, L + 1 = top
    assert lr_scale(3, 2, 0.5) == 1.0
    assert lr_scale(2, 2, 0.5) == 0.5
    assert lr_scale(1, 2, 0.5) == 0.25
    assert lr_scale(0, 2, 0.5) == 0.125
    assert lr_scale(0, 2, None) == 1.0


def test_llrd_param_groups_tiny_bert() -> None:
    model, head, n_layers = _tiny_bert_classifier()
    assert n_layers == 2
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= head
    lr, decay = 1e-3, 0.5
    cfg = TrainConfig(layer_lr_decay=decay, weight_decay=0.01)
    groups = param_groups(model, cfg, lr, n_layers, head)

    by_name = {}
    for g in groups:
        assert len(g["names"]) == len(g["params"])
        for name, p in zip(g["names"], g["params"], strict=True):
            assert name not in by_name
            by_name[name] = (g["lr"], g["weight_decay"], p)

    params = dict(model.named_parameters())
    assert set(by_name) == set(params)  # every trainable parameter, once
    seen_kinds = set()
    for name, (group_lr, wd, p) in by_name.items():
        assert p is params[name]
        if name.startswith("bert.embeddings."):
            expected, kind = lr * decay ** (n_layers + 1), "emb"  # 1.25e-4
        elif ".layer." in name:
            k = int(name.split(".layer.")[1].split(".")[0])
            expected, kind = lr * decay ** (n_layers - k), f"block{k}"  # block 0: 2.5e-4, block 1: 5e-4
        else:  # pooler, classifier
            expected, kind = lr, "top"
        seen_kinds.add(kind)
        assert group_lr == pytest.approx(expected, rel=1e-12), name
        if p.ndim < 2:
            assert wd == 0.0, name  # biases and LayerNorm weights
        else:
            assert wd == 0.01, name
    assert seen_kinds == {"emb", "block0", "block1", "top"}
    assert by_name["bert.embeddings.word_embeddings.weight"][:2] == (pytest.approx(1.25e-4), 0.01)
    assert by_name["bert.embeddings.LayerNorm.weight"][:2] == (pytest.approx(1.25e-4), 0.0)
    assert by_name["bert.encoder.layer.0.attention.self.query.weight"][:2] == (pytest.approx(2.5e-4), 0.01)
    assert by_name["bert.encoder.layer.1.output.dense.bias"][:2] == (pytest.approx(5e-4), 0.0)
    assert by_name["classifier.weight"][:2] == (pytest.approx(1e-3), 0.01)
    # groups are sorted by decreasing lr, and (lr, wd) pairs are unique
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys)) == 8
    assert [k[0] for k in keys] == sorted((k[0] for k in keys), reverse=True)
    # the optimizer takes the groups as they are
    opt = build_optimizer(groups, cfg)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]


def test_param_groups_without_llrd_and_frozen_params() -> None:
    model, head, n_layers = _tiny_bert_classifier()
    for name, p in model.named_parameters():
        p.requires_grad_(name in head)
    groups = param_groups(model, TrainConfig(weight_decay=0.1), 2e-3, n_layers, head)
    names = {n for g in groups for n in g["names"]}
    assert names == head
    assert {g["lr"] for g in groups} == {2e-3}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([], TrainConfig())


def test_adafactor_first_step_is_relative_to_each_weights_rms() -> None:
    """Adafactor's first step, worked by hand: beta2_1 = 1 - 1^-0.8 = 0, so the factored second moment of a
    constant gradient c is c^2, the update is sign(g) (RMS 1: the clipping at d=1 leaves it) and the step is
    lr * max(1e-3, RMS(w)): a weight moves relative to its size, a tiny one by at least lr * 1e-3."""
    big = nn.Parameter(torch.full((4, 6), 2.0))
    small = nn.Parameter(torch.full((4, 6), 1e-5))
    opt = build_optimizer([{"params": [big, small], "lr": 0.01, "weight_decay": 0.0, "names": ["big", "small"]}],
                          TrainConfig(optimizer="adafactor"))
    assert isinstance(opt, torch.optim.Adafactor)
    big.grad = torch.full_like(big, 0.3)
    small.grad = torch.full_like(small, -7.0)
    opt.step()
    assert torch.allclose(big.detach(), torch.full((4, 6), 2.0 - 0.01 * 2.0), atol=1e-7)
    assert torch.allclose(small.detach(), torch.full((4, 6), 1e-5 + 0.01 * 1e-3), atol=1e-9)


def test_adafactor_run_learns_and_resumes(tmp_path: Path, tiny_csv: Callable[..., Path]) -> None:
    """A run under Adafactor learns, and stopping after its step-4 checkpoint then resuming (its factored
    second moments restored) ends with the weights of the uninterrupted run."""
    data = tiny_csv(rows=EASY_ROWS)
    args = ("train.optimizer=adafactor", "train.lr=1e-2", "train.schedule=constant", "train.warmup_steps=0",
            "train.max_steps=8", "train.save_steps=4", "train.eval_steps=4")
    a = _run(tmp_path, data, *args, name="a")
    losses = [v for _, v in _train_losses(a.run_dir)]
    assert losses[-1] < losses[0]
    assert load_config(a.run_dir / "config.yaml").train.optimizer == "adafactor"

    interrupt_after_checkpoint(lambda: _run(tmp_path, data, *args, name="b"))
    cfg = load_config(tmp_path / "b" / "config.yaml")
    b = train(cfg, resume=True, quiet=True)
    wa = load_file(str(a.run_dir / "model" / "model.safetensors"))
    wb = load_file(str(b.run_dir / "model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_optimizer_choice_is_validated() -> None:
    with pytest.raises(Exception, match=r"train\.optimizer") as e:
        load_config(None, ["model=tiny-bert", "data.train=x.csv", "train.optimizer=sgd"])
    assert "adafactor" in str(e.value)


# --------------------------------------------------------------------------- schedules
def _lrs(schedule: str, total: int, lr: float = 1.0, **kw: Any) -> list[float]:
    """LR in effect for optimizer steps 1..total (what the loop uses)."""
    p = nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(schedule=schedule, **kw)
    opt = torch.optim.AdamW([{"params": [p], "lr": lr}])
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_schedule_with_warmup() -> None:
    lrs = _lrs("linear", 10, lr=1e-3, warmup_steps=2)
    # step s (0-based): s < W: s/W; else (T - s) / (T - W)
    expected = [0.0, 0.5e-3] + [1e-3 * (10 - s) / 8 for s in range(2, 10)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[2] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1.25e-4)


def test_cosine_schedule_with_warmup() -> None:
    lrs = _lrs("cosine", 10, lr=1.0, warmup_steps=2)
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[6] == pytest.approx(0.5)  # half-way through the decay


def test_constant_schedule_with_warmup() -> None:
    lrs = _lrs("constant", 8, lr=2e-3, warmup_steps=4)
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3, 2e-3])


def test_warmup_ratio_and_clamp() -> None:
    # warmup_ratio 0.3 of 10 steps = 3 warmup steps
    lrs = _lrs("linear", 10, warmup_ratio=0.3)
    assert lrs[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert lrs[9] == pytest.approx(1 / 7)
    # warmup_steps beats warmup_ratio; no warmup starts at the peak
    assert _lrs("constant", 4, warmup_ratio=0.5, warmup_steps=0) == pytest.approx([1.0] * 4)
    # more warmup than steps is clamped to the run length
    assert _lrs("constant", 4, warmup_steps=100) == pytest.approx([0.0, 0.25, 0.5, 0.75])


# --------------------------------------------------------------------------- precision
def test_precision_resolution_and_autocast() -> None:
    assert resolve_precision("auto") == ("bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32")
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with Runtime.cpu("fp32").autocast():
        assert lin(x).dtype == torch.float32
    with Runtime.cpu("bf16").autocast():
        out = lin(x)
    assert out.dtype == torch.bfloat16  # matmuls in bf16 ...
    assert lin.weight.dtype == torch.float32  # ... master weights stay fp32


# --------------------------------------------------------------------------- pipeline runs on tiny-bert
PRECISIONS = [
    "fp32",
    pytest.param("bf16", marks=pytest.mark.skipif(not cpu_has_bf16(), reason="no native bf16")),
]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_is_deterministic_and_learns(
    precision: str, tmp_path: Path, tiny_csv: Callable[..., Path]
) -> None:
    data = tiny_csv(rows=EASY_ROWS)
    args = (
        "train.max_steps=8",
        "train.lr=1e-3",
        "train.schedule=constant",
        "train.warmup_steps=0",
        f"train.precision={precision}",
    )
    a = _run(tmp_path, data, *args, name="a")
    b = _run(tmp_path, data, *args, name="b")
    la, lb = _train_losses(a.run_dir), _train_losses(b.run_dir)
    assert [s for s, _ in la] == list(range(1, 9))
    assert la == lb  # bit-identical loss curves
    assert a.metrics["train"]["precision"] == precision
    assert a.metrics["train"]["steps"] == 8
    assert a.metrics["train"]["final_loss"] == la[-1][1]
    assert a.metrics["eval"] == b.metrics["eval"]
    first, last = la[0][1], la[-1][1]
    assert first == pytest.approx(math.log(2), abs=0.2)  # random head over 2 classes
    assert last < first
    # same weights at the end
    wa = load_file(str(a.run_dir / "model" / "model.safetensors"))
    wb = load_file(str(b.run_dir / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_different_seed_changes_the_run(tmp_path: Path, tiny_csv: Callable[..., Path]) -> None:
    data = tiny_csv(rows=EASY_ROWS)
    a = _run(tmp_path, data, "train.max_steps=2", "train.seed=1", name="a")
    b = _run(tmp_path, data, "train.max_steps=2", "train.seed=2", name="b")
    assert _train_losses(a.run_dir) != _train_losses(b.run_dir)


def _nan_at_call(monkeypatch: pytest.MonkeyPatch, bad_call: int) -> list[int]:
    calls: list[int] = []
    real = ClassificationObjective.loss

    def loss(self, model, batch):
        calls.append(1)
        out = real(self, model, batch)
        return out * float("nan") if len(calls) == bad_call else out

    monkeypatch.setattr(ClassificationObjective, "loss", loss)
    return calls


def test_nonfinite_skip_finishes(tmp_path: Path, tiny_csv: Callable[..., Path], monkeypatch) -> None:
    calls = _nan_at_call(monkeypatch, 3)
    res = _run(tmp_path, tiny_csv(), "train.max_steps=5", "train.nonfinite=skip")
    assert len(calls) == 5  # one micro-batch per step
    assert res.metrics["train"]["nonfinite_steps"] == 1
    assert res.metrics["train"]["steps"] == 5
    assert _metrics(res.run_dir)["train"]["nonfinite_steps"] == 1
    losses = dict(_train_losses(res.run_dir))
    assert sorted(losses) == [1, 2, 3, 4, 5]  # step 3 is logged (lr), without a loss
    assert losses[3] is None
    assert all(math.isfinite(losses[s]) for s in (1, 2, 4, 5))


def test_nonfinite_stop_raises_and_keeps_checkpoint(
    tmp_path: Path, tiny_csv: Callable[..., Path], monkeypatch
) -> None:
    _nan_at_call(monkeypatch, 3)
    with pytest.raises(TrainingError) as info:
        _run(tmp_path, tiny_csv(), "train.max_steps=6", "train.save_steps=2", "train.nonfinite=stop")
    err = info.value
    assert err.exit_code == 3
    assert "step 3" in str(err)
    ckpt_root = tmp_path / "run" / "checkpoints"
    last = latest_checkpoint(ckpt_root)
    assert last is not None and last.name == "step-00000002"
    assert str(last) in str(err)
    assert [p.name for p in ckpt_root.iterdir() if p.name.startswith(".")] == []
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 2
    assert state["finished"] is False
    # the checkpoint loads into a fresh model and restores exactly its tensors
    model, _, _ = _tiny_bert_classifier(3)
    load_trainable(model, last)
    saved = load_file(str(last / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert len(saved) == len(params)  # method full: every parameter is checkpointed
    assert all(torch.equal(params[k], v) for k, v in saved.items())
    opt = torch.load(last / "optim.pt", weights_only=False)
    assert opt["scheduler"]["last_epoch"] == 2


def test_checkpoint_rotation_keeps_last_k_and_best(tmp_path: Path, tiny_csv: Callable[..., Path]) -> None:
    # lr ~ 0: accuracy never improves after the first eval (step 3), so step 3 stays the best
    res = _run(
        tmp_path,
        tiny_csv(),
        "train.max_steps=10",
        "train.save_steps=2",
        "train.save_total_limit=2",
        "train.eval_steps=3",
        "train.lr=1e-12",
    )
    ckpt_root = res.run_dir / "checkpoints"
    names = sorted(p.name for p in ckpt_root.iterdir())
    assert res.metrics["train"]["best_step"] == 3
    assert names == ["step-00000003", "step-00000008", "step-00000010"]
    assert [s for s, _ in list_checkpoints(ckpt_root)] == [3, 8, 10]
    for step, path in list_checkpoints(ckpt_root):
        assert json.loads((path / "state.json").read_text())["step"] == step
        assert (path / "trainable.safetensors").is_file() and (path / "optim.pt").is_file()
    evals = [r["step"] for r in read_metrics(res.run_dir) if r["split"] == "eval"]
    assert evals == [3, 6, 9, 10]


def test_early_stopping(tmp_path: Path, tiny_csv: Callable[..., Path]) -> None:
    res = _run(
        tmp_path,
        tiny_csv(),
        "train.max_steps=20",
        "train.eval_steps=1",
        "train.early_stopping_patience=2",
        "train.lr=1e-12",
    )
    m = _metrics(res.run_dir)
    assert m["train"]["stopped_early"] is True
    assert m["train"]["steps"] == 3
    assert m["train"]["best_step"] == 1
    evals = [r for r in read_metrics(res.run_dir) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert len({r["accuracy"] for r in evals}) == 1
