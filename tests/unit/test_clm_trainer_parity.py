"""tuneforge's causal-LM pretraining vs the Hugging Face ``Trainer`` (issue 16: held-out loss 6.20 vs 6.11).

1. Given the same rows in the same order, a scratch ``task=clm`` run takes the Trainer's optimizer steps: the
   same initial weights, AdamW groups (no decay on biases and LayerNorm weights), warmup + linear rates,
   clipping and per-token loss. Per-step losses and final weights agree to float32 round-off once the
   Trainer counts GPT-2's tokens right (2.).
2. transformers 5 (checked on 5.23) divides a GPT-2 batch's summed next-token NLL by the number of *unshifted*
   labels: ``Trainer._loss_shifts_labels`` is false because ``GPT2LMHeadModel``'s class name does not end in
   ``ForCausalLM`` (its ``loss_type`` is None). Each row of T tokens predicts T - 1 of them, so the Trainer's
   training and evaluation losses are (T - 1) / T of the mean NLL per predicted token, which is what tuneforge
   reports: 127/128 at rows of 128, 0.048 lower at a loss of 6.2. Compare held-out losses computed the same
   way (``benchmarks/bench_pretrain.py`` does), never tuneforge's against ``Trainer.evaluate``'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.tokenizers_train import train_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "src" / "tuneforge" / "assets" / "tiny_corpus.txt"
STEPS, BATCH = 6, 4


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def _no_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's dropout draws from the global RNG in an order that differs between the two loops."""
    import tuneforge.models.scratch as scratch

    build = scratch.scratch_config

    def config(run, tokenizer=None):
        cfg = build(run, tokenizer)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        return cfg

    monkeypatch.setattr(scratch, "scratch_config", config)


def test_scratch_clm_steps_equal_the_hf_trainer_on_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

    from tuneforge.models.scratch import build_scratch
    from tuneforge.objectives.clm import ClmObjective
    from tuneforge.pipeline import train

    _no_dropout(monkeypatch)
    train_tokenizer([CORPUS], tmp_path / "tok", type="bytelevel-bpe", vocab_size=600, min_frequency=1)
    run = load_config(None, [
        "task=clm", "model.init=scratch", "model.architecture=gpt2", f"model.tokenizer={tmp_path / 'tok'}",
        "model.size=tiny", f"data.train={CORPUS}", "data.max_length=64", f"train.batch_size={BATCH}",
        f"train.max_steps={STEPS}", "train.lr=3e-3", "train.warmup_steps=2", "train.weight_decay=0.01",
        "train.max_grad_norm=1.0", "train.precision=fp32", "train.log_steps=1", "train.seed=3",
        "train.tensorboard=false", "train.load_best_at_end=false", f"output_dir={tmp_path / 'run'}"])
    train(run, quiet=True)
    ours = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "train"]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")

    # The Trainer: the same model built the same way, fed tuneforge's rows in tuneforge's order.
    set_seed(3)
    model, tok = build_scratch(run, AutoModelForCausalLM)
    model.loss_type = "ForCausalLM"  # the Trainer then counts shifted labels (see the module docstring, 2.)
    objective = ClmObjective(run)
    docs = objective.load_data(run).splits["train"]  # the training documents, after the validation carve
    rows = objective.prepare(docs, tok, run)
    order = [i for b in rows.plan(0, BATCH, seed=3, shuffle=True)[:STEPS] for i in b]
    data = [{"ids": rows.columns["input_ids"][i]} for i in order]

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(x["ids"]) for x in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for j, x in enumerate(items):
            ids[j, : len(x["ids"])] = labels[j, : len(x["ids"])] = torch.tensor(x["ids"])
        return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

    theirs: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                theirs.append(logs["loss"])

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                             learning_rate=3e-3, warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0,
                             lr_scheduler_type="linear", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             seed=3, disable_tqdm=True, train_sampling_strategy="sequential",
                             remove_unused_columns=False, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Losses()]).train()

    assert len(ours) == len(theirs) == STEPS
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-4)
    for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def test_hf_trainer_reports_gpt2_loss_over_unshifted_tokens_tuneforge_over_predicted_ones(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tuneforge.data.packing import lm_batches
    from tuneforge.engine.runtime import Runtime
    from tuneforge.objectives.causal_lm import evaluate_lm

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    rows = torch.randint(1, 97, (6, 32))
    ours = evaluate_lm(model, lm_batches({"input_ids": rows.tolist(), "labels": rows.tolist()}, 0, group_by_length=False),
                       batch_size=4, runtime=Runtime.cpu())
    assert ours["tokens"] == 6 * 31  # every token but each row's first is predicted
    with torch.no_grad():
        logits = model(rows).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), rows[:, 1:].reshape(-1))
    assert ours["loss"] == pytest.approx(float(by_hand), rel=1e-5)

    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to=[],
                             disable_tqdm=True)
    assert model.loss_type is None
    theirs = Trainer(model=model, args=args).evaluate(eval_dataset=data)["eval_loss"]
    assert theirs == pytest.approx(ours["loss"] * 31 / 32, rel=1e-5)
    model.loss_type = "ForCausalLM"
    fixed = Trainer(model=model, args=args).evaluate(eval_dataset=data)["eval_loss"]
    assert fixed == pytest.approx(ours["loss"], rel=1e-5)
