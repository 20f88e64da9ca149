"""DPO (``task: dpo``) on tiny-llama: the step-0 oracles on a real model, the reference (precomputed from the base,
or a method's live `Reference`) stays the base while the policy trains, learning on synthetic pairs, the CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_preference_data import synthetic_pairs, write_jsonl

from conftest import interrupt_after_checkpoint
from tuneforge.config import load_config
from tuneforge.engine.runtime import Runtime
from tuneforge.methods import METHODS
from tuneforge.models import resolve_model
from tuneforge.objectives import get_objective
from tuneforge.objectives.causal_lm import TokenNLL
from tuneforge.pipeline import train
from tuneforge.wiring import wire

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from _common import cli


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dpo-data")
    return (write_jsonl(root / "train.jsonl", synthetic_pairs(64, seed=0)),
            write_jsonl(root / "val.jsonl", synthetic_pairs(16, seed=1)))


def overrides(train_file: Path, val: Path, *extra: str) -> list[str]:
    return ["model=tiny-llama", "task=dpo", f"data.train={train_file}", f"data.validation={val}",
            "data.max_length=48", "task.template=chatml", "train.batch_size=8", "train.warmup_steps=0",
            "train.schedule=constant", "train.precision=fp32", "train.tensorboard=false", "train.seed=0", *extra]


def _wired(pairs, *extra: str):
    run = load_config(None, overrides(*pairs, *extra))
    objective = get_objective(run)
    data = objective.load_data(run)
    runtime = Runtime.for_run(run.train)
    return run, objective, data, runtime, wire(run, objective, data, resolve_model(run.model.name), runtime, 2)


@pytest.mark.parametrize(("loss", "expected", "precision"), [
    ("sigmoid", math.log(2), "fp32"), ("hinge", 1.0, "fp32"), ("ipo", 25.0, "fp32"),
    ("sigmoid", math.log(2), "bf16"),  # reference log-probs are precomputed under the autocast training uses
])
def test_untrained_lora_policy_gives_the_oracle_loss_and_chance_accuracy(pairs, loss: str, expected: float,
                                                                         precision: str) -> None:
    run, objective, data, runtime, wired = _wired(pairs, "method=lora", f"task.loss={loss}",
                                                  f"train.precision={precision}")
    val = objective.prepare(data.splits["validation"], wired.built.tokenizer, run)
    # the batches reference log-probs were computed in (bf16 results depend on the padded batch shape)
    m = objective.evaluate(wired.model, val, batch_size=objective._eval_batch_size(), runtime=runtime)
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["reward_accuracy"] == 0.5 and m["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert m["chosen_logps"] < 0 and m["examples"] == 16


def _strip(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "ref_logps"}


#: every method that trains a causal LM (frozen trains a separate task head only: refused by the config);
#: bitfit on tiny-gpt2 (llama has no biases); qlora's base is the quantised model, not the one loaded in build
REFERENCE_METHODS = [m for m in sorted(METHODS) if m not in ("frozen", "qlora")]
MODEL = {"bitfit": "tiny-gpt2"}


@pytest.mark.parametrize("method", REFERENCE_METHODS)
def test_live_reference_stays_the_base_while_the_policy_trains(pairs, method: str) -> None:
    """The method's `Reference` bound with ``use_reference`` gives the base's log-probs (= the ones precomputed
    from the freshly loaded model) after the policy moved; the policy's own log-probs have moved away from
    them, so a reference that were the trained policy fails the first assertion."""
    run, objective, data, runtime, wired = _wired(pairs, f"method={method}", f"model={MODEL.get(method, 'tiny-llama')}")
    model = wired.model
    objective.use_reference(wired.method.reference(model))
    batches = objective.prepare(data.splits["train"], wired.built.tokenizer, run)
    batch = runtime.to_device(batches.collate(list(range(8))))  # where wire put the model (CUDA when present)
    base = batch["ref_logps"].T.reshape(-1)  # precomputed in build with the model before the method
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        out = objective.forward(model, _strip(batch))
        assert torch.allclose(out.ref_logps, base, atol=1e-4)  # live reference == precomputed base, every step
        objective.loss(out, batch).backward()
        opt.step()
    model.eval()  # no dropout: the two policy passes below must agree
    with torch.no_grad():
        out = objective.forward(model, _strip(batch))
        again = objective.forward(model, _strip(batch))
    assert torch.allclose(out.ref_logps, base, atol=1e-4)
    assert (out.logps - base).abs().max() > 1e-2, "the policy did not move"
    assert torch.allclose(again.logps, out.logps, atol=1e-5)  # the trained weights are back after the context


def test_dpo_learns_synthetic_preferences(pairs, tmp_path: Path) -> None:
    from tuneforge.inference import evaluate_file

    res = train(load_config(None, overrides(*pairs, "method=full", "train.lr=3e-3", "train.max_steps=40",
                                            "train.eval_steps=40", f"output_dir={tmp_path / 'run'}")), quiet=True)
    m = res.metrics["splits"]["validation"]
    assert m["reward_accuracy"] >= 0.9 and m["loss"] < 0.5 and m["reward_margin"] > 0
    assert m["chosen_reward"] > m["rejected_reward"]
    # eval of the saved run: the reference is the base model named in its config, loaded again
    again = evaluate_file(res.run_dir, pairs[1], [])
    assert again["loss"] == pytest.approx(m["loss"], rel=1e-4) and again["reward_accuracy"] == m["reward_accuracy"]


def test_cli_train_eval_json_and_bad_inputs(pairs, tmp_path: Path) -> None:
    train_file, val = pairs
    args = [f"{a}" for a in overrides(train_file, val, "train.max_steps=3", "method=lora", "output_dir=run")]
    cli("train", *args, "-q", cwd=tmp_path)
    proc = cli("eval", "run", "--data", str(val), "--json", cwd=tmp_path)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
            "rejected_logps"} <= set(metrics)
    # a DPO run is a chat model like an SFT run: generate (chat mode by default) and merge work on it
    gen = json.loads(cli("generate", "run", "what do you think of the car?", "max_new_tokens=3",
                         cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert gen["prompt"] == "what do you think of the car?" and isinstance(gen["generation"], str)
    assert "merged 'lora'" in cli("merge", "run", "merged", cwd=tmp_path).stdout
    assert (tmp_path / "merged" / "config.json").is_file()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "a"}])
    args = [a if not a.startswith("data.train=") else f"data.train={bad}" for a in args]
    proc = cli("train", *args, "output_dir=run2", cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "bad.jsonl:3" in out and "'rejected'" in out


def test_resume_after_an_interruption_gives_the_same_weights(pairs, tmp_path: Path) -> None:
    """Stopped right after its step-3 checkpoint and resumed, a full-weights DPO run ends with the weights of an
    uninterrupted one (1e-6): the reference log-probs are computed again from the freshly loaded base model
    on resume, not from the resumed policy (which would change every later loss)."""
    from safetensors.torch import load_file

    def run(out: str):
        return load_config(None, overrides(*pairs, "method=full", "train.lr=3e-3", "train.max_steps=6",
                                           "train.save_steps=3", f"output_dir={tmp_path / out}"))

    whole = train(run("whole"), quiet=True)
    interrupt_after_checkpoint(lambda: train(run("cut"), quiet=True), step=3)
    resumed = train(run("cut"), resume=True, quiet=True)
    a, b = (load_file(r.run_dir / "model" / "model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert resumed.metrics["splits"]["validation"]["loss"] == pytest.approx(
        whole.metrics["splits"]["validation"]["loss"], abs=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_output_layer_gives_the_same_dpo_loss_and_gradients(pairs, precision: str) -> None:
    """With LoRA the frozen output layer runs fused with the log-probs (``train.chunked_cross_entropy``, no
    [N, vocab] logits kept); loss, every LoRA gradient and the logits read back on demand match the plain
    projection + cross-entropy of ``train.chunked_cross_entropy=false``."""
    results = []
    for fused in ("true", "false"):
        run, objective, data, runtime, wired = _wired(pairs, "method=lora", f"train.precision={precision}",
                                                      f"train.chunked_cross_entropy={fused}", "method.dropout=0")
        torch.manual_seed(1)  # the same nonzero LoRA B for both runs: a policy away from the reference
        for p in wired.model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)
        batch = runtime.to_device(objective.prepare(data.splits["train"], wired.built.tokenizer, run).collate(list(range(8))))
        with runtime.autocast():
            out = objective.forward(wired.model, batch)
            loss = objective.loss(out, batch)
            logits = out.logits.detach().float()  # read back in the step's precision, as distillation does
        loss.backward()
        grads = {n: p.grad.clone() for n, p in wired.model.named_parameters() if p.grad is not None}
        assert isinstance(out.scored, TokenNLL) is (fused == "true")
        results.append((loss.detach(), out.logps.detach(), grads, logits))
    (loss_f, logps_f, grads_f, logits_f), (loss_p, logps_p, grads_p, logits_p) = results
    tol = 1e-5 if precision == "fp32" else 2e-3
    assert float(loss_f) == pytest.approx(float(loss_p), rel=tol)
    assert torch.allclose(logps_f, logps_p, rtol=tol, atol=tol)
    assert torch.allclose(logits_f, logits_p, atol=tol)
    assert grads_f.keys() == grads_p.keys() and grads_f
    # bf16: the output layer's gradient rounds differently in its last bit (test_chunked_ce), which the bf16
    # matmuls below carry on (measured <= 0.7% of a gradient's largest entry here)
    bound = 2.5e-2 if precision == "bf16" else 1e-5
    for name, g in grads_f.items():
        torch.testing.assert_close(g, grads_p[name], rtol=0, atol=bound * float(grads_p[name].abs().max()) + 1e-9,
                                   msg=name)


def test_reference_log_probs_of_a_trained_head_are_fused_only_without_autograd(pairs) -> None:
    """Precomputing reference log-probs (no autograd) fuses even a trainable output layer, so an untrained
    LoRA policy (frozen head: fused) scores its batches on the same path; training a full model's head
    (autograd on) keeps the plain projection its weight gradient needs."""
    _, objective, _, _, wired = _wired(pairs, "method=full")
    model = wired.model
    head = model.get_output_embeddings()
    assert head.weight.requires_grad and objective.fused_head(model) is None
    with torch.no_grad():
        assert objective.fused_head(model) is head
