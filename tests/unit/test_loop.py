"""The supervised loop run directly on a linear model over `TensorBatches`, where exact equalities can be
asserted: gradient accumulation, steps per epoch, the non-finite policy, exact resume, budget checks."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config import TrainConfig
from tuneforge.data.batching import TensorBatches
from tuneforge.engine import LoopContext, Runtime, param_groups
from tuneforge.engine.checkpoint import list_checkpoints
from tuneforge.engine.loop import Trainer
from tuneforge.engine.loops import steps_per_epoch
from tuneforge.errors import ConfigError, TrainingError


# --------------------------------------------------------------------------- Trainer on a linear model
class _ToyObjective:
    """Cross-entropy of a linear model on TensorBatches; ``loss_fn`` can replace the loss."""

    def __init__(self, loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None):
        self.calls = 0
        self.loss_fn = loss_fn

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        return F.cross_entropy(model(batch["features"]), batch["labels"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs

    def evaluate(self, model, data, *, batch_size, runtime) -> dict[str, Any]:
        b = data.collate(list(range(len(data))))
        with torch.no_grad():
            return {"loss": float(F.cross_entropy(model(b["features"]), b["labels"]))}


class _ListLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, str, dict]] = []

    def log(self, step: int, split: str, row: dict) -> None:
        self.rows.append((step, split, dict(row)))


def _toy_data(n: int, dim: int = 5) -> TensorBatches:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    return TensorBatches({"features": x, "labels": (x[:, 0] + 0.3 * x[:, 1] > 0).long()})


def _toy_trainer(tmp_path: Path, data: TensorBatches, objective: Any = None, **train: Any) -> Trainer:
    torch.manual_seed(0)
    model = nn.Linear(data.tensors["features"].shape[1], 2)
    cfg = TrainConfig(**{"lr": 0.05, "warmup_steps": 0, "tensorboard": False, **train})
    return Trainer(LoopContext(
        model=model,
        module=model,
        objective=objective or _ToyObjective(),
        train_data=data,
        eval_data=None,
        cfg=cfg,
        groups=param_groups(model, cfg, cfg.lr, 0),
        run_dir=tmp_path,
        runtime=Runtime.cpu(),
        logger=_ListLogger(),
        metric="loss",
        greater_is_better=False,
        quiet=True,
    ))


@pytest.mark.parametrize("n", [32, 36])  # 36: the last step of each epoch has one micro-batch of 4
def test_grad_accum_matches_large_batch(n: int, tmp_path: Path) -> None:
    data = _toy_data(n)
    small = _toy_trainer(tmp_path / "a", data, batch_size=4, grad_accum=2, epochs=2)
    large = _toy_trainer(tmp_path / "b", data, batch_size=8, grad_accum=1, epochs=2)
    assert small.steps_per_epoch == large.steps_per_epoch == math.ceil(n / 8)
    small.fit()
    large.fit()
    assert small.state.step == large.state.step == 2 * math.ceil(n / 8)
    assert small.state.samples_seen == large.state.samples_seen == 2 * n
    for p, q in zip(small.model.parameters(), large.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    ls = [r["loss"] for _, split, r in small.logger.rows if split == "train"]
    ll = [r["loss"] for _, split, r in large.logger.rows if split == "train"]
    assert ls == pytest.approx(ll, abs=1e-6)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize(
    ("n", "batch_size", "accum"), [(40, 5, 2), (44, 5, 2), (54, 4, 2), (54, 4, 3), (7, 8, 4)]
)
def test_optimizer_steps_per_epoch_with_accumulation(
    n: int, batch_size: int, accum: int, tmp_path: Path
) -> None:
    data = _toy_data(n)
    n_batches = math.ceil(n / batch_size)
    assert len(data.plan(0, batch_size, seed=1, shuffle=True)) == n_batches
    assert steps_per_epoch(n_batches, accum) == math.ceil(n_batches / accum)
    obj = _ToyObjective()
    tr = _toy_trainer(tmp_path, data, obj, batch_size=batch_size, grad_accum=accum, epochs=1)
    steps = []
    real_step = tr.optimizer.step

    def counting_step(*a, **kw):
        steps.append(1)
        return real_step(*a, **kw)

    tr.optimizer.step = counting_step
    tr.fit()
    assert tr.total_steps == math.ceil(n_batches / accum)
    assert len(steps) == tr.state.step == math.ceil(n_batches / accum)
    assert obj.calls == n_batches  # every micro-batch once
    assert tr.state.samples_seen == n
    assert tr.state.epoch == 1 and tr.state.batch_in_epoch == 0


def test_fractional_epochs_total_steps(tmp_path: Path) -> None:
    tr = _toy_trainer(tmp_path, _toy_data(40), batch_size=4, grad_accum=2, epochs=1.5)
    assert tr.steps_per_epoch == 5
    assert tr.total_steps == 8  # ceil(1.5 * 5)
    tr = _toy_trainer(tmp_path, _toy_data(40), batch_size=4, epochs=1.5, max_steps=3)
    assert tr.total_steps == 3


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_skip_policy_leaves_weights_and_stops_after_max_in_a_row(tmp_path: Path) -> None:
    data = _toy_data(32)
    obj = _ToyObjective(lambda m, b: F.cross_entropy(m(b["features"]), b["labels"]) * float("inf"))
    tr = _toy_trainer(tmp_path, data, obj, batch_size=4, max_steps=10, nonfinite="skip", max_nonfinite=3)
    before = [p.detach().clone() for p in tr.model.parameters()]
    with pytest.raises(TrainingError, match="3 in a row"):
        tr.fit()
    assert tr.state.nonfinite_total == 3 and tr.state.step == 2  # raised inside step 3
    assert all(torch.equal(p, q) for p, q in zip(before, tr.model.parameters(), strict=True))
    assert tr.scheduler.last_epoch == 2  # skipped steps still advance the schedule


def _nan_grad_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    # finite value (0) whose gradient is 0/0 = NaN: d/dw sqrt(sum((w - w0)^2)) at w = w0
    w = model.weight
    return torch.sqrt(((w - w.detach()) ** 2).sum()) + 0 * F.cross_entropy(
        model(batch["features"]), batch["labels"]
    )


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_nonfinite_gradient_is_skipped_with_clipping(tmp_path: Path) -> None:
    tr = _toy_trainer(
        tmp_path, _toy_data(16), _ToyObjective(_nan_grad_loss), batch_size=4, max_steps=2, max_grad_norm=1.0
    )
    tr.fit()
    assert tr.state.nonfinite_total == 2
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_nonfinite_gradient_is_skipped_without_clipping(tmp_path: Path) -> None:
    tr = _toy_trainer(
        tmp_path, _toy_data(16), _ToyObjective(_nan_grad_loss), batch_size=4, max_steps=2, max_grad_norm=0.0
    )
    tr.fit()
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert tr.state.nonfinite_total == 2


def _resume_from(tmp_path: Path, data: TensorBatches, step: int, **kw: Any) -> tuple[Trainer, Trainer]:
    """Train fully, then resume a fresh trainer (fresh weights) from the checkpoint at ``step``."""
    full = _toy_trainer(tmp_path / "full", data, **kw)
    full.fit()
    part = _toy_trainer(tmp_path / "part", data, **kw)
    name = f"step-{step:08d}"
    shutil.copytree(tmp_path / "full" / "checkpoints" / name, tmp_path / "part" / "checkpoints" / name)
    assert part.resume() is True
    assert part.state.step == step
    part.fit()
    return full, part


RESUME_KW = {"batch_size": 4, "grad_accum": 2, "epochs": 3, "save_steps": 3, "save_total_limit": 10}


def test_resume_within_first_epoch_is_exact(tmp_path: Path) -> None:
    # 40 rows, batch 4, accum 2: 10 micro-batches, 5 steps per epoch, 15 steps
    full, part = _resume_from(tmp_path, _toy_data(40), 3, **RESUME_KW)
    assert [s for s, _ in list_checkpoints(tmp_path / "full" / "checkpoints")] == [3, 6, 9, 12, 15]
    assert full.state.step == part.state.step == 15
    assert part.state.samples_seen == full.state.samples_seen == 120
    for p, q in zip(full.model.parameters(), part.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_each_epoch_uses_its_own_plan(tmp_path: Path) -> None:
    data = _toy_data(40)
    seen: list[list[int]] = []
    collate = data.collate
    data.collate = lambda idx: (seen.append(list(idx)), collate(idx))[1]  # type: ignore[method-assign]
    _toy_trainer(tmp_path, data, batch_size=4, epochs=3).fit()
    plans = [data.plan(e, 4, seed=42, shuffle=True) for e in range(3)]
    assert seen[:10] == plans[0]
    assert plans[1] != plans[0]
    assert seen[10:20] == plans[1]
    assert seen[20:30] == plans[2]


def test_resume_after_first_epoch_is_exact(tmp_path: Path) -> None:
    full, part = _resume_from(tmp_path, _toy_data(40), 6, **RESUME_KW)
    for p, q in zip(full.model.parameters(), part.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_refuses_different_budget(tmp_path: Path) -> None:
    data = _toy_data(16)
    first = _toy_trainer(tmp_path, data, batch_size=4, max_steps=4, save_steps=2)
    first.fit()
    other = _toy_trainer(tmp_path, data, batch_size=4, max_steps=6, save_steps=2)
    with pytest.raises(ConfigError, match="total steps") as err:
        other.resume()
    assert err.value.key == "train.max_steps" and err.value.exit_code == 2
