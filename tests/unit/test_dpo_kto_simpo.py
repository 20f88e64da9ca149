"""KTO and SimPO on tiny-llama: the step-0 oracles on a real model, KTO's mismatched KL pairs, learning on
synthetic data, and KTO's loss against TRL's ``KTOTrainer._compute_loss`` on the same random log-probs."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_dpo import overrides
from test_preference_data import synthetic_pairs, synthetic_unpaired, write_jsonl

from tuneforge.config import load_config
from tuneforge.engine.runtime import Runtime
from tuneforge.models import resolve_model
from tuneforge.objectives import get_objective
from tuneforge.objectives.preference_losses import kto_loss
from tuneforge.pipeline import train
from tuneforge.wiring import wire


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("kto-simpo")
    return {"simpo": (write_jsonl(root / "pairs.jsonl", synthetic_pairs(64, 0)),
                      write_jsonl(root / "pairs_val.jsonl", synthetic_pairs(16, 1))),
            "kto": (write_jsonl(root / "kto.jsonl", synthetic_unpaired(64, 0)),
                    write_jsonl(root / "kto_val.jsonl", synthetic_unpaired(16, 1)))}


def _untrained(task: str, files, *extra: str):
    run = load_config(None, [*overrides(*files[task], "method=lora", *extra), f"task={task}"])
    objective = get_objective(run)
    data = objective.load_data(run)
    runtime = Runtime.for_run(run.train)
    wired = wire(run, objective, data, resolve_model(run.model.name), runtime, 2)
    val = objective.prepare(data.splits["validation"], wired.built.tokenizer, run)
    return objective, wired, val, objective.evaluate(wired.model, val, batch_size=8, runtime=runtime)


def test_kto_untrained_policy_loses_half_per_example_and_pairs_each_prompt_with_the_next_completion(files) -> None:
    _, wired, val, m = _untrained("kto", files, "task.desirable_weight=1.0", "task.undesirable_weight=1.0")
    assert m["loss"] == pytest.approx(0.5, rel=1e-6) and m["kl"] == 0.0 and m["reward_accuracy"] == 0.5
    assert val.sides == ("chosen", "kl") and val.extra["desirable"].tolist() == [i % 2 == 0 for i in range(16)]
    tok = wired.built.tokenizer
    rows = synthetic_unpaired(16, 1)
    kl_text = tok.decode([t for t in val.columns["kl_labels"][0] if t != -100])
    assert kl_text.startswith(rows[1]["completion"])  # example 0's prompt with example 1's completion
    batch = val.collate([0, 1])
    assert batch["input_ids"].shape[0] == 4 and batch["ref_logps"].shape == (2, 2)


def test_simpo_untrained_loss_is_the_formula_on_the_policys_own_logps_and_needs_no_reference(files) -> None:
    objective, wired, val, m = _untrained("simpo", files)
    assert "ref_logps" not in val.extra
    batch = val.collate(list(range(len(val))))
    wired.model.eval()
    with torch.no_grad():
        out = objective.forward(wired.model, batch)
    avg = out.logps / out.tokens
    n = len(val)
    expected = -torch.nn.functional.logsigmoid(2.0 * (avg[:n] - avg[n:]) - 0.5).mean()
    assert m["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(("task", "lr"), [("kto", 3e-3), ("simpo", 1e-3)])
def test_learns_synthetic_preferences(task: str, lr: float, files, tmp_path: Path) -> None:
    res = train(load_config(None, [*overrides(*files[task], "method=full", f"train.lr={lr}", "train.max_steps=40",
                                              "train.eval_steps=40", f"output_dir={tmp_path / 'run'}"),
                                   f"task={task}"]), quiet=True)
    m = res.metrics["splits"]["validation"]
    assert m["reward_accuracy"] >= 0.9 and m["reward_margin"] > 0
    assert m["loss"] < (0.5 if task == "kto" else -math.log(1 / (1 + math.exp(0.5))))


def test_kto_loss_equals_trl() -> None:
    """TRL 1.16's ``KTOTrainer._compute_loss`` on a stand-in trainer and model returning the same random summed
    log-probs (completions and the mismatched KL completions, policy and precomputed reference)."""
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(0)
    n, beta = 8, 0.1
    label = torch.tensor([True, False, True, True, False, False, True, False])
    policy, ref, kl_policy, kl_ref = (-(torch.rand(n, generator=g) * 30 + 5) for _ in range(4))
    kl_policy = kl_policy + 3.0  # a positive KL estimate, so the clamp does not zero it
    width = 4
    per_token = torch.zeros(n, width - 1)
    per_token[:, 0] = policy
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, aux_loss=None)
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=accel, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=1.3, undesirable_weight=0.8, _tp_size=1,
        _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)),
        _compute_kl_logps=lambda model, batch: kl_policy,
    )
    mask = torch.ones(n, width, dtype=torch.long)
    inputs = {"input_ids": torch.zeros(n, width, dtype=torch.long), "attention_mask": mask, "completion_mask": mask,
              "label": label, "ref_logps": ref, "ref_KL_logps": kl_ref}
    theirs = KTOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    z = (kl_policy - kl_ref).mean()
    ours = kto_loss(policy, ref, label, z, beta=beta, desirable_weight=1.3, undesirable_weight=0.8).mean()
    assert torch.allclose(ours, theirs, rtol=1e-6), (float(ours), float(theirs))


def test_kto_live_reference_equals_the_precomputed_base_after_training(files) -> None:
    objective, wired, val, _ = _untrained("kto", files)
    objective.use_reference(wired.method.reference(wired.model))
    batch = val.collate(list(range(8)))
    opt = torch.optim.Adam([p for p in wired.model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        objective.loss(objective.forward(wired.model, batch), batch).backward()
        opt.step()
    wired.model.eval()
    with torch.no_grad():
        live = objective.forward(wired.model, {k: v for k, v in batch.items() if k != "ref_logps"})
    assert torch.allclose(live.ref_logps, batch["ref_logps"].T.reshape(-1), atol=1e-4)
    assert (live.logps - live.ref_logps).abs().max() > 1e-2
