"""Cures for forgetting (`retain:`): L2-SP, EWC and distillation, against their formulas and plain loops.

* L2-SP's gradient is ``alpha (w - w0)`` on anchored weights and ``beta w`` on the head;
* EWC's Fisher is the mean of squared per-example gradients computed by a plain loop (vmap path on tiny-bert
  classification, and the loop fallback on a causal LM whose loss scores only labelled positions); its penalty
  is ``lambda/2 sum F (w - w0)^2``;
* the KD term is ``T^2 KL(softmax(t/T) || softmax(s/T))`` (torch's own KL on probabilities);
* the default teacher computes as the starting model while the student's adapter and head move; L2-SP keeps
  a run's weights nearer their start; EWC's Fisher is cached in the run; bad settings name their key.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.extensions.anchors import anchors
from tuneforge.extensions.distill import kd_loss
from tuneforge.extensions.ewc import empirical_fisher, ewc_penalty
from tuneforge.extensions.l2sp import l2sp_penalty
from tuneforge.pipeline import train


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def _rows(path: Path, n: int, labels=("pos", "neg"), offset: int = 0) -> Path:
    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "book"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(offset, offset + n):
            w.writerow([" ".join(words[(i * k + 3) % len(words)] for k in range(1, 3 + i % 4)), labels[i % len(labels)]])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("retain")
    return {"train": _rows(d / "train.csv", 48), "val": _rows(d / "val.csv", 16, offset=48),
            "general": _rows(d / "general.csv", 24, offset=100), "three": _rows(d / "three.csv", 30, ("a", "b", "c"))}


def base_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["model=tiny-bert", f"data.train={files['train']}", f"data.validation={files['val']}", "train.batch_size=8",
            "train.max_steps=6", "train.log_steps=1", "train.lr=1e-2", "train.warmup_steps=0", "train.precision=fp32",
            "train.tensorboard=false", "train.seed=0", f"output_dir={out}", *extra]


# ------------------------------------------------------------------------------------------- formulas
def test_l2sp_gradient_is_alpha_times_distance_and_beta_times_head() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    a = anchors(model, {"1.weight", "1.bias"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    alpha, beta = 0.3, 0.05
    l2sp_penalty(a, alpha, beta).backward()
    for _, p, p0 in a.anchored:
        assert torch.allclose(p.grad, alpha * (p - p0), atol=1e-6)
    for _, p in a.head:
        assert torch.allclose(p.grad, beta * p, atol=1e-6)
    assert [n for n, _, _ in a.anchored] == ["0.weight", "0.bias"]


def test_ewc_penalty_formula() -> None:
    model = nn.Linear(3, 2)
    a = anchors(model, set())
    with torch.no_grad():
        model.weight.add_(1.0)
    fisher = {"weight": torch.full((2, 3), 2.0), "bias": torch.ones(2)}
    # only the weight moved, by 1 each: lambda/2 * sum(2 * 1^2) = lambda/2 * 12
    assert float(ewc_penalty(a, fisher, 0.5).detach()) == pytest.approx(0.25 * 12)


def test_kd_loss_equals_t2_kl_of_softened_distributions() -> None:
    torch.manual_seed(0)
    s, t, temp = torch.randn(5, 7), torch.randn(5, 7), 3.0
    pt, ps = F.softmax(t / temp, -1), F.softmax(s / temp, -1)
    expected = temp**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert float(kd_loss(s, t, temp)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-7)


def _loop_fisher(objective, model, examples, names) -> dict[str, torch.Tensor]:
    """The definition: for each example alone, a backward pass; the mean of the squared gradients."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    model.eval()
    for ex in examples:
        model.zero_grad()
        objective.loss(objective.forward(model, ex), ex).backward()
        for n in names:
            total[n] += params[n].grad.pow(2)
    return {n: t / len(examples) for n, t in total.items()}


@pytest.mark.parametrize(("task", "model_name", "expect"), [("classification", "tiny-bert", "vmap"),
                                                              ("clm", "tiny-llama", "loop")])
def test_fisher_equals_mean_of_squared_per_example_gradients(task: str, model_name: str, expect: str,
                                                             files: dict[str, Path], tmp_path: Path) -> None:
    from tuneforge.models.registry import resolve_model
    from tuneforge.objectives import get_objective

    if task == "clm":
        text = tmp_path / "t.txt"
        text.write_text("".join(f"the {w} sat on the mat number {i}\n" for i, w in enumerate(["cat", "dog"] * 6)),
                        encoding="utf-8")
        run = load_config(None, [f"model={model_name}", "task=clm", f"data.train={text}", "data.max_length=16"])
    else:
        run = load_config(None, [f"model={model_name}", f"data.train={files['train']}", f"data.validation={files['val']}"])
    objective = get_objective(run)
    data = objective.load_data(run)
    built = objective.build(run, resolve_model(model_name), data)
    batches = objective.prepare(data.splits["train"], built.tokenizer, run)
    examples = [batches.collate(ix) for ix in batches.plan(0, 1, seed=0, shuffle=True)[:6]]
    names = [n for n, _ in built.model.named_parameters()][:12]
    fisher, how = empirical_fisher(objective, built.model, examples, names)
    assert how == expect
    reference = _loop_fisher(objective, built.model, examples, names)
    for n in names:
        assert torch.allclose(fisher[n], reference[n], rtol=1e-4, atol=1e-9), n
    assert any(float(f.abs().sum()) > 0 for f in fisher.values())


# ------------------------------------------------------------------------------------------- in runs
def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


def test_default_teacher_is_the_starting_model_while_the_student_trains(files: dict[str, Path]) -> None:
    from tuneforge.engine import Runtime
    from tuneforge.extensions import RunContext, create_extensions
    from tuneforge.models.registry import resolve_model
    from tuneforge.objectives import get_objective
    from tuneforge.wiring import wire

    run = load_config(None, base_args(files, Path("unused"), "method=lora", "retain.distill.weight=2",
                                      "retain.distill.temperature=3"))
    objective = get_objective(run)
    data = objective.load_data(run)
    distill = next(e for e in create_extensions(run, objective, data) if e.name == "distill")
    wired = wire(run, objective, data, resolve_model("tiny-bert"), Runtime.cpu(), 2)
    ctx = RunContext(run, objective, data, Runtime.cpu(), True, built=wired.built, model=wired.model,
                     head_names=set(wired.ctx.head_names))
    distill.on_train_start(ctx)
    batches = objective.prepare(data.splits["validation"], wired.built.tokenizer, run)
    batch = batches.collate(batches.plan(0, 8, seed=0, shuffle=False)[0])
    model = wired.model.eval()
    with torch.no_grad():
        start = objective.forward(model, batch).logits.clone()
        for p in model.parameters():  # "train": move the adapter and the head
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
        outputs = objective.forward(model, batch)
        with distill.teacher() as teacher:
            seen = objective.forward(teacher, batch).logits
    assert float((outputs.logits - start).abs().max()) > 1e-2  # the student moved...
    assert torch.allclose(seen, start, atol=1e-6)  # ...the teacher is still the starting model
    expected = 2 * kd_loss(outputs.logits, start, 3.0)
    assert float(distill.extra_loss(model, batch, outputs)) == pytest.approx(float(expected), rel=1e-5)


def test_l2sp_keeps_weights_nearer_their_start(files: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tuneforge.models.registry import resolve_model

    start = load_file(str(resolve_model("tiny-bert") / "model.safetensors"))
    key = next(k for k in start if k.endswith("attention.self.query.weight"))

    def moved(out: Path) -> float:
        final = load_file(str(out / "model" / "model.safetensors"))
        return float((final["bert." + key.removeprefix("bert.")] - start[key]).norm())

    free = train(load_config(None, base_args(files, tmp_path / "free")), quiet=True).run_dir
    held = train(load_config(None, base_args(files, tmp_path / "held", "retain.l2sp.alpha=50")), quiet=True).run_dir
    assert moved(held) < 0.7 * moved(free)


def test_ewc_fisher_is_cached_in_the_run(files: dict[str, Path], tmp_path: Path) -> None:
    from tuneforge.extensions.ewc import FISHER_FILE

    res = train(load_config(None, base_args(files, tmp_path / "ewc", f"retain.ewc.fisher_data={files['general']}",
                                            "retain.ewc.fisher_samples=8", "retain.ewc.lambda=1000")), quiet=True)
    assert (res.run_dir / FISHER_FILE).is_file()
    saved = load_config(res.run_dir / "config.yaml")  # the retain block round-trips through config.yaml
    assert saved.retain["ewc"].lambda_ == 1000 and saved.retain["ewc"].fisher_samples == 8


@pytest.mark.parametrize(("extra", "key", "message"), [
    (["retain.ewc.lambda=1"], "retain", "retain.ewc.fisher_data Field required"),
    (["retain.forgetting.general_eval=x"], "retain", "not a cure for forgetting; retain takes: distill, ewc, l2sp"),
    (["retain.l2sp.alpha=-1"], "retain", "retain.l2sp.alpha Input should be greater than or equal to 0"),
    (["retain.distill.teacher=/no/such/run"], "retain.distill.teacher", "teacher not found"),
])
def test_bad_retain_settings_name_the_key(files: dict[str, Path], tmp_path: Path, extra: list[str], key: str,
                                          message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        train(load_config(None, base_args(files, tmp_path / "bad", *extra)), quiet=True)
    assert (info.value.key or "").startswith(key), info.value.key
    assert not (tmp_path / "bad").exists()


def test_teacher_with_another_label_set_is_refused_before_the_run_dir(files: dict[str, Path], tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    train(load_config(None, ["model=tiny-bert", f"data.train={files['three']}", "train.max_steps=1",
                             "train.tensorboard=false", f"output_dir={teacher}"]), quiet=True)
    with pytest.raises(ConfigError, match="another vocabulary or label set") as info:
        train(load_config(None, base_args(files, tmp_path / "student", f"retain.distill.teacher={teacher}")), quiet=True)
    assert info.value.key == "retain.distill.teacher"
    assert not (tmp_path / "student").exists()


# ------------------------------------------------------------------------------------------- replay
def test_replay_plan_holds_the_ratio_uses_every_domain_batch_and_is_pure() -> None:
    import numpy as np

    from tuneforge.data.batching import TokenBatches, num_batches
    from tuneforge.data.replay import ReplayBatches

    def part(n: int) -> TokenBatches:
        return TokenBatches({"input_ids": [[1] * (2 + i % 9) for i in range(n)], "labels": [0] * n}, 0)

    data = ReplayBatches(part(200), part(30), 0.25)
    plan = data.plan(1, 8, seed=3, shuffle=True)
    general = [b for b in plan if b[0] >= data.offset]
    assert len(plan) == num_batches(data, 8) == 25 + 8
    assert len(general) / len(plan) == pytest.approx(0.25, abs=0.01)
    assert sorted(i for b in plan if b[0] < data.offset for i in b) == list(range(200))
    assert all(all(i >= data.offset for i in b) for b in general)
    assert plan == ReplayBatches(part(200), part(30), 0.25).plan(1, 8, seed=3, shuffle=True)
    positions = [k for k, b in enumerate(plan) if b[0] >= data.offset]
    assert np.ptp(positions) > len(plan) // 2  # spread over the epoch, not bunched at one end
    batch = data.collate(general[0])
    assert batch["input_ids"].shape[0] == len(general[0])


def test_replay_data_in_the_wrong_layout_names_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "general.csv"
    bad.write_text("sentence,score\nhello,1\n", encoding="utf-8")
    from tuneforge.errors import DataError

    with pytest.raises(DataError, match=r"general.csv: text column 'text' not found") as info:
        train(load_config(None, base_args(files, tmp_path / "run", f"retain.replay.data={bad}")), quiet=True)
    assert info.value.exit_code == 2
    assert not (tmp_path / "run").exists()


def test_ewc_with_a_head_only_method_is_refused_before_the_run_dir(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trains only a task head") as info:
        train(load_config(None, base_args(files, tmp_path / "run", "method=frozen",
                                          f"retain.ewc.fisher_data={files['general']}")), quiet=True)
    assert info.value.key == "retain.ewc" and not (tmp_path / "run").exists()
