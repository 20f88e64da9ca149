"""Benchmark: causal-LM pretraining of a tiny GPT-2 from scratch, tuneforge vs the Hugging Face Trainer:
tokens/s and held-out loss.

Same work for every run (each a fresh subprocess):

* Text: the first ``--train-kb`` KB of tinyshakespeare (cut at a line end) to train on, the next
  ``--heldout-kb`` KB as the held-out part; a ``--vocab`` byte-level BPE trained here on the training part.
* Stream: every non-empty line is a document, tokenized with the tokenizer's defaults and followed by EOS;
  the documents are concatenated and cut into rows of ``--block`` tokens (tuneforge ``task=clm`` with its
  defaults ``txt_unit=line``, ``packing=blocks``; for HF the script builds the same rows; the last, shorter
  row is dropped for HF and kept by tuneforge).
* Model: GPT-2, ``--layers`` x ``--hidden``, ``--heads`` heads, built by ``tuneforge.models.scratch`` from
  the same config and seed (the same initial weights, dropout 0.1 as GPT2Config's default).
* Optimisation: batch ``--batch-size``, AdamW lr 1e-3 (betas 0.9/0.999, eps 1e-8), weight decay 0.01 on
  matrices only (not on biases and LayerNorm weights, in both), clipping 1.0, linear schedule with the same
  integer warmup ``ceil(0.06 x steps)``, ``--steps`` optimizer steps.
* Held-out loss: mean next-token NLL per token over the held-out rows (built the same way from the
  held-out part, the last shorter row included), the model in eval mode, under the autocast the run
  trained with. tuneforge: its own end-of-training evaluation; HF: the same computation in this script on
  the same rows (checked against tuneforge's own number on tuneforge's model: equal to 1e-6).

Runs: ``hf-default`` (Trainer defaults, fp32), ``hf-bf16`` (``bf16=True``), ``hf-bf16-alloc`` (the same
in a process given tuneforge's malloc settings, `engine.allocator`: what part of the ratio is the allocator),
``tuneforge`` (its defaults: bf16 autocast where `precision: auto` finds it faster than fp32, ``train.tune_allocator``) and
``tuneforge-fp32`` (the same with ``train.precision=fp32``: no autocast, the run to compare with ``hf-default``) and
``tuneforge-compile`` (the same with ``train.compile=blocks``; its time includes the compile). Throughput =
trained tokens / training-loop wall time (tuneforge: ``train_seconds``; HF: ``train_runtime``), evaluation
excluded. CPU utilisation = process CPU time / (wall x torch threads) over ``Trainer.fit`` (tuneforge, its
final evaluation included) or ``Trainer.train`` (HF); a warning names runs below 85%.

    python benchmarks/bench_pretrain.py [--steps 150] [--seeds 0,1,2] [--runs hf-bf16,tuneforge] [--device auto]

``--device auto`` trains on CUDA when present (bf16 autocast there for ``hf-bf16`` and tuneforge); results
then go to ``results/pretrain-cuda.json`` and each run also reports its peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    add_device_arg,
    cpu_clock,
    describe_device,
    device_peak_mib,
    fmt_mib,
    gpu_name,
    peak_rss_mib,
    pick_device,
    results_path,
    synchronize,
    warn_if_shared,
)

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "pretrain.json"
RUNS = ("hf-default", "hf-bf16", "hf-bf16-alloc", "tuneforge", "tuneforge-fp32", "tuneforge-compile")
TUNEFORGE_EXTRA = {"tuneforge": [], "tuneforge-fp32": ["train.precision=fp32"],
                   "tuneforge-compile": ["train.compile=blocks"]}  # regional torch.compile


def _warmup(steps: int) -> int:
    return math.ceil(0.06 * steps)


def _overrides(work: Path, out: Path, a: argparse.Namespace, seed: int) -> list[str]:
    return ["task=clm", "model.init=scratch", "model.architecture=gpt2", f"model.tokenizer={work / 'tok'}",
            f"model.layers={a.layers}", f"model.hidden={a.hidden}", f"model.heads={a.heads}",
            f"data.train={work / 'train.txt'}", f"data.validation={work / 'heldout.txt'}", f"data.max_length={a.block}",
            f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", "train.lr=1e-3", "train.weight_decay=0.01",
            f"train.warmup_steps={_warmup(a.steps)}", "train.max_grad_norm=1.0", "train.eval_steps=1000000",
            "train.save_steps=1000000", "train.tensorboard=false", f"train.seed={seed}", "train.load_best_at_end=false",
            f"train.device={a.device}", f"output_dir={out}"]


def _rows(tokenizer, path: Path, block: int) -> list[list[int]]:
    """The rows tuneforge's ``task=clm`` makes of ``path`` (lines + EOS, concatenated, cut)."""
    from tuneforge.data.packing import pack_blocks

    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    eos = tokenizer.eos_token_id
    docs = [[*x, eos] for x in tokenizer(lines, return_attention_mask=False, verbose=False)["input_ids"]]
    return pack_blocks(docs, block)["input_ids"]


def heldout_loss(model, rows: list[list[int]], bf16: bool, device: str = "cpu", batch_size: int = 16) -> float:
    """Token-weighted mean next-token NLL of ``model`` over ``rows`` (eval mode, inference mode)."""
    import torch
    import torch.nn.functional as F

    model.eval().to(device)
    total, count = 0.0, 0
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, : len(r)] = torch.tensor(r)
                labels[j, : len(r)] = torch.tensor(r)
            ids, labels = ids.to(device), labels.to(device)
            logits = model(input_ids=ids, attention_mask=(labels != -100).long()).logits
            total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def run_tuneforge(work: Path, a: argparse.Namespace, seed: int, name: str = "tuneforge") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.config import load_config
    from tuneforge.engine.loop import Trainer
    from tuneforge.pipeline import train

    out = work / f"{name}-{seed}"
    fit, clock = Trainer.fit, {}

    def fit_clocked(self):
        with cpu_clock() as c:
            result = fit(self)
            synchronize(a.device)
        clock.update(c)
        return result

    Trainer.fit = fit_clocked
    res = train(load_config(None, [*_overrides(work, out, a, seed), *TUNEFORGE_EXTRA[name]]), quiet=True, overwrite=True)
    t = res.metrics["train"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    rows = _rows(AutoTokenizer.from_pretrained(out / "model"), work / "heldout.txt", a.block)
    return {"tokens": a.steps * a.batch_size * a.block, "seconds": t["train_seconds"], "precision": t["precision"],
            "cpu_util": clock["cpu_util"], "heldout_loss": res.metrics["splits"]["validation"]["loss"],
            "heldout_loss_script": heldout_loss(model, rows, t["precision"] == "bf16", a.device)}


def run_hf(work: Path, a: argparse.Namespace, seed: int, bf16: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from tuneforge.config import load_config
    from tuneforge.models.scratch import build_scratch

    set_seed(seed)
    run = load_config(None, _overrides(work, work / "hf", a, seed))
    model, tokenizer = build_scratch(run, AutoModelForCausalLM)
    rows = [torch.tensor(r) for r in _rows(tokenizer, work / "train.txt", a.block) if len(r) == a.block]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                             learning_rate=1e-3, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
                             warmup_steps=_warmup(a.steps), bf16=bf16, use_cpu=a.device == "cpu", report_to=[], save_strategy="no",
                             logging_steps=10**6, seed=seed, dataloader_num_workers=0, disable_tqdm=True)
    with cpu_clock() as clock:
        out = Trainer(model=model, args=args, train_dataset=data).train()
    return {"tokens": a.steps * a.batch_size * a.block, "seconds": out.metrics["train_runtime"],
            "precision": "bf16" if bf16 else "fp32", "cpu_util": clock["cpu_util"],
            "heldout_loss": heldout_loss(model, _rows(tokenizer, work / "heldout.txt", a.block), bf16, a.device)}


def prepare(work: Path, a: argparse.Namespace) -> None:
    """The training and held-out text files and the tokenizer, in ``work``."""
    from tuneforge.tokenizers_train import train_tokenizer

    text = TEXT.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, a.train_kb * 1000) + 1
    end = text.rfind("\n", 0, cut + a.heldout_kb * 1000) + 1
    (work / "train.txt").write_text(text[:cut], encoding="utf-8")
    (work / "heldout.txt").write_text(text[cut:end], encoding="utf-8")
    train_tokenizer([work / "train.txt"], work / "tok", type="bytelevel-bpe", vocab_size=a.vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--train-kb", type=int, default=500)
    p.add_argument("--heldout-kb", type=int, default=50)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # a single run, in this process
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    add_device_arg(p)
    a = p.parse_args()
    a.device = pick_device(a.device)
    if a.one:
        if a.one == "hf-bf16-alloc":
            from tuneforge.engine.allocator import tune_cpu_allocator

            tune_cpu_allocator()
        res = (run_tuneforge(a.work, a, a.seed, a.one) if a.one in TUNEFORGE_EXTRA
               else run_hf(a.work, a, a.seed, a.one.startswith("hf-bf16")))
        print("RESULT " + json.dumps(res | {"peak_rss_mib": peak_rss_mib(), "gpu_peak_mib": device_peak_mib(a.device)}))
        return
    if not TEXT.is_file():
        sys.exit(f"{TEXT} not found (the shared data folder)")
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if bad := [r for r in runs if r not in RUNS]:
        sys.exit(f"unknown run {bad[0]!r}; allowed: {', '.join(RUNS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    print(f"load average at start: {os.getloadavg()[0]:.1f} (compare runs only within one invocation); device "
          f"{describe_device(a.device)}", flush=True)
    results: dict[str, dict[int, dict]] = {name: {} for name in runs}
    passthrough = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--block", str(a.block),
                   "--layers", str(a.layers), "--hidden", str(a.hidden), "--heads", str(a.heads), "--device", a.device]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, a)
        for seed in seeds:
            for name in runs:
                cmd = [sys.executable, __file__, "--one", name, "--seed", str(seed), "--work", str(work), *passthrough]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{name} (seed {seed}) failed:\n{proc.stderr[-3000:]}")
                r = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                results[name][seed] = r
                print(f"{name:>10} seed {seed}: {r['tokens_per_s']:8.0f} tokens/s ({r['precision']}, {r['seconds']:.1f} s), "
                      f"held-out loss {r['heldout_loss']:.4f}, peak RSS {r['peak_rss_mib']:.0f} MiB, GPU "
                      f"{fmt_mib(r['gpu_peak_mib'])} MiB, "
                      f"cpu util {100 * r['cpu_util']:.0f}%", flush=True)
    print("\nrun         tokens/s (mean)   held-out loss per seed            mean")
    for name in runs:
        rs = [results[name][s] for s in seeds]
        losses = [r["heldout_loss"] for r in rs]
        print(f"{name:>10}  {statistics.mean(r['tokens_per_s'] for r in rs):14.0f}   "
              f"{', '.join(f'{x:.4f}' for x in losses):32s}  {statistics.mean(losses):.4f}")
    if a.device == "cpu":
        warn_if_shared({f"{n} seed {s}": results[n][s]["cpu_util"] for n in runs for s in seeds})
    for ours in (r for r in runs if r in TUNEFORGE_EXTRA):
        tf = statistics.mean(results[ours][s]["tokens_per_s"] for s in seeds)
        for name in ("hf-default", "hf-bf16", "hf-bf16-alloc"):
            if name in runs:
                print(f"{ours} / {name}: {tf / statistics.mean(results[name][s]['tokens_per_s'] for s in seeds):.2f}x")
    out = results_path(RESULTS, a.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a) | {"work": None}, "gpu": gpu_name(a.device), "results": results},
                              indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
