"""Benchmark: causal-LM pretraining of a small GPT-2 from scratch, tuneforge vs the Hugging Face Trainer.

Both train the same model (GPT-2, 4 layers x 256, 4 heads, built from the same config and seed around the
same 8k byte-level BPE trained here on tinyshakespeare) on rows of exactly ``--block`` tokens (lines
tokenized, EOS appended, concatenated and cut: the rows have the same shape and the same amount of work;
tuneforge packs its own rows from the file with ``task=clm``), with the same batch size, AdamW lr 1e-3,
weight decay 0.01, clipping 1.0, linear schedule without warmup and the same number of optimizer steps. Each
run is a fresh subprocess; throughput = trained tokens / wall time of the training loop (tuneforge:
``train_seconds`` from its metrics; HF: ``train_runtime`` of ``Trainer.train``), no evaluation.

* ``hf-default``: transformers ``Trainer`` at its defaults (fp32).
* ``hf-bf16``:    the same with ``bf16=True`` (tuneforge's ``precision: auto`` uses bf16 when the CPU has it).
* ``tuneforge``:  ``tuneforge.pipeline.train`` with ``task=clm model.init=scratch`` at its defaults.

    python benchmarks/bench_pretrain.py [--steps 60] [--batch-size 8] [--block 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "pretrain.json"
RUNS = ("hf-default", "hf-bf16", "tuneforge")


def _overrides(tok: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return ["task=clm", "model.init=scratch", "model.architecture=gpt2", f"model.tokenizer={tok}", "model.size=small",
            f"data.train={TEXT}", f"data.validation={TEXT}", "data.max_eval_samples=1", f"data.max_length={a.block}",
            f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", "train.lr=1e-3", "train.warmup_steps=0",
            "train.eval_steps=100000", "train.save_steps=100000", "train.tensorboard=false", "train.seed=0",
            "train.load_best_at_end=false", f"output_dir={out}"]


def run_tuneforge(tok: Path, work: Path, a: argparse.Namespace) -> dict:
    from tuneforge.config import load_config
    from tuneforge.pipeline import train

    res = train(load_config(None, _overrides(tok, work / "tf", a)), quiet=True)
    t = res.metrics["train"]
    return {"tokens": a.steps * a.batch_size * a.block, "seconds": t["train_seconds"], "precision": t["precision"]}


def run_hf(tok: Path, work: Path, a: argparse.Namespace, bf16: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from tuneforge.config import load_config
    from tuneforge.models.scratch import build_scratch

    set_seed(0)
    run = load_config(None, _overrides(tok, work / "hf", a))
    model, tokenizer = build_scratch(run, AutoModelForCausalLM)
    lines = [x for x in TEXT.read_text(encoding="utf-8").splitlines() if x.strip()]
    ids = [t for x in tokenizer(lines)["input_ids"] for t in [*x, tokenizer.eos_token_id]]
    rows = torch.tensor(ids[: len(ids) // a.block * a.block]).view(-1, a.block)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                             learning_rate=1e-3, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
                             warmup_steps=0, bf16=bf16, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=10**6, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=data).train()
    return {"tokens": a.steps * a.batch_size * a.block, "seconds": out.metrics["train_runtime"],
            "precision": "bf16" if bf16 else "fp32"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # a single run, in this process
    p.add_argument("--tok", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        res = run_tuneforge(a.tok, a.work, a) if a.one == "tuneforge" else run_hf(a.tok, a.work, a, a.one == "hf-bf16")
        print("RESULT " + json.dumps(res))
        return
    if not TEXT.is_file():
        sys.exit(f"{TEXT} not found (the shared data folder)")
    from tuneforge.tokenizers_train import train_tokenizer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tok"
        train_tokenizer([TEXT], tok, type="bytelevel-bpe", vocab_size=8000)
        for name in RUNS:
            cmd = [sys.executable, __file__, "--one", name, "--tok", str(tok), "--work", str(Path(tmp) / name),
                   "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--block", str(a.block)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            results[name] = r
            print(f"{name:>10}: {r['tokens_per_s']:8.0f} tokens/s ({r['precision']}, {r['seconds']:.1f} s)", flush=True)
    for name in ("hf-default", "hf-bf16"):
        print(f"tuneforge / {name}: {results['tuneforge']['tokens_per_s'] / results[name]['tokens_per_s']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(a) | {"tok": None, "work": None}, "results": results}, indent=2,
                                  default=str) + "\n")


if __name__ == "__main__":
    main()
