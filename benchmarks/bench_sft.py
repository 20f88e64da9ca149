"""Benchmark: LoRA instruction tuning of SmolLM2-135M with packing, tuneforge vs TRL's ``SFTTrainer`` (+ peft).

Same work for every run, each in its own fresh subprocess:

* data: ``../shared/data/instruct/alpaca_en_demo.json``; a seeded 10% is held out, and the first
  ``--train-examples`` of the rest are trained on for one epoch. Both tools get the same conversations
  (written once as OpenAI ``messages`` rows for tuneforge and as conversational prompt/completion rows for
  TRL), rendered with SmolLM2's own chat template, loss on the assistant reply only;
* model: the bundled ``smollm2-135m`` in fp32 weights, bf16 autocast (TRL's default ``bf16=True``; tuneforge's
  ``precision: auto``), SDPA attention;
* packing: whole examples packed into rows of ``--max-length`` tokens by best-fit decreasing, attention kept
  inside each example through restarting ``position_ids`` (TRL ``packing=True``, its default ``bfd`` strategy;
  tuneforge ``task.packing=documents``);
* LoRA r 16, alpha 32, dropout 0.05 on every linear layer (peft ``all-linear``); AdamW lr ``--lr``, no weight
  decay, clipping 1.0, linear schedule without warmup; ``--batch-size`` packed rows per step.

Runs: ``trl-default`` (SFTConfig defaults apart from the settings above, so gradient checkpointing on, its
default), ``trl-no-gc`` (``gradient_checkpointing=False``, the fastest TRL setting here), ``trl-no-gc-alloc``
(the same in a process given tuneforge's malloc settings, `engine.allocator`: what part of the ratio is the
allocator), ``trl-no-gc-fp32`` (``trl-no-gc`` with ``bf16=False``: TRL's fastest setting on a CPU where bf16
matmuls are slower than fp32 ones, AVX512-BF16 without AMX, where tuneforge's ``precision: auto`` takes fp32)
and ``tuneforge``.

* **tokens/s**: tokens in the packed training rows / wall time of the training loop (TRL: ``on_train_begin``
  to ``on_train_end``; tuneforge: ``Trainer.fit`` minus its end-of-training evaluation and checkpoint).
* **cpu util**: process CPU time / (loop wall time x torch threads); a warning names runs below 85%.
* **held-out loss**: mean NLL per response token on the held-out examples, computed for every run by the
  same code (tuneforge's `evaluate_lm` on the same rows), plus the base model's before training.

    python benchmarks/bench_sft.py [--train-examples 160] [--max-length 512] [--batch-size 4] [--device auto] [--profile DIR]

``--device auto`` trains on CUDA when present (TRL without ``use_cpu``; tuneforge ``train.device=cuda``; the
held-out loss computed there too); results then go to ``results/sft-cuda.json`` with each run's peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    add_device_arg,
    cpu_util,
    describe_device,
    device_peak_mib,
    fmt_mib,
    peak_rss_mib,
    pick_device,
    profiled,
    results_path,
    synchronize,
    warn_if_shared,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
RESULTS = ROOT / "benchmarks" / "results" / "sft.json"
RUNS = ("trl-default", "trl-no-gc", "trl-no-gc-alloc", "trl-no-gc-fp32", "tuneforge")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
PROFILE_SKIP, PROFILE_STEPS = 3, 10  # --profile: 10 of the 17 optimizer steps at the defaults, after 3


def write_data(work: Path, n_train: int) -> dict:
    """Seeded 10% held out; the first ``n_train`` of the rest; both as jsonl for each tool."""
    import numpy as np

    from tuneforge.data.chat import read_conversations

    convs = read_conversations(DATA)
    perm = np.random.default_rng(0).permutation(len(convs))
    n_val = round(0.1 * len(convs))
    val = [convs.items[i].messages for i in sorted(perm[:n_val])]
    train = [convs.items[i].messages for i in sorted(perm[n_val:])][:n_train]
    for name, rows in (("train", train), ("val", val)):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"messages": m}) + "\n" for m in rows)
    with open(work / "train_trl.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": m[:-1], "completion": m[-1:]}) + "\n" for m in train)
    return {"train_examples": len(train), "heldout_examples": len(val)}


def _overrides(a: argparse.Namespace) -> list[str]:
    return ["model=smollm2-135m", "task.name=sft", "task.packing=documents", "method.name=lora",
            f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}", f"method.dropout={LORA['dropout']}",
            "method.target_modules=all-linear", f"data.train={a.work / 'train.jsonl'}",
            f"data.validation={a.work / 'val.jsonl'}", f"data.max_length={a.max_length}",
            f"train.batch_size={a.batch_size}", "train.epochs=1", f"train.lr={a.lr}", "train.schedule=linear",
            "train.warmup_steps=0", "train.weight_decay=0", "train.max_grad_norm=1.0", f"train.seed={a.seed}",
            "train.tensorboard=false", "train.eval_batch_size=8", f"train.device={a.device}",
            f"output_dir={a.work / ('tf-' + str(a.one))}",
            *a.tuneforge_override]


def heldout_loss(model, tokenizer, a: argparse.Namespace) -> float:
    """Response loss on the held-out rows, by the same code for every run."""
    from tuneforge.config import load_config
    from tuneforge.engine import Runtime
    from tuneforge.objectives.causal_lm import evaluate_lm
    from tuneforge.objectives.sft import SftObjective

    run = load_config(None, _overrides(a))
    objective = SftObjective(run)
    data = objective.load_data(run)
    rows = objective.prepare(data.splits["validation"], tokenizer, run)
    runtime = Runtime.cpu("bf16") if a.device == "cpu" else Runtime.create(a.device, "bf16")
    return evaluate_lm(runtime.move(model), rows, batch_size=8, runtime=runtime)["loss"]


def child_trl(a: argparse.Namespace, gc: bool, bf16: bool = True) -> dict:
    import torch
    import transformers as hf
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tuneforge.models import resolve_model

    path = resolve_model("smollm2-135m")
    tok = hf.AutoTokenizer.from_pretrained(path)
    hf.set_seed(a.seed)
    model = hf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    out = {}
    if a.base_loss:
        out["base_heldout_loss"] = heldout_loss(model, tok, a)
    train_ds = load_dataset("json", data_files=str(a.work / "train_trl.jsonl"), split="train")

    class Clock(hf.TrainerCallback):
        begin = end = cpu = 0.0

        def on_train_begin(self, *_, **__):
            self.begin, self.cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, *_, **__):
            synchronize(a.device)
            self.end, self.cpu = time.perf_counter(), time.process_time() - self.cpu

    cfg = SFTConfig(output_dir=str(a.work / f"run-{a.one}"), per_device_train_batch_size=a.batch_size,
                    num_train_epochs=1, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=1.0, max_length=a.max_length, packing=True,
                    gradient_checkpointing=gc, bf16=bf16, use_cpu=a.device == "cpu", seed=a.seed, report_to="none", save_strategy="no",
                    logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0)
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_ds, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[clock])
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    with profiled(a.profile, a.one, a.device, active=PROFILE_STEPS, skip=PROFILE_SKIP) as tick:
        if a.profile:  # the headline runs carry no extra callback
            trainer.add_callback(type("Tick", (hf.TrainerCallback,), {"on_step_end": lambda *_, **__: tick()}))
        trainer.train()
    loop = clock.end - clock.begin
    trainer.model.eval()
    out |= {"tokens": tokens, "rows": len(trainer.train_dataset), "steps": trainer.state.global_step,
            "loop_s": loop, "tokens_per_s": tokens / loop, "bf16": cfg.bf16, "gradient_checkpointing": gc,
            "cpu_util": cpu_util(clock.cpu, loop),
            "heldout_loss": heldout_loss(trainer.model, tok, a)}
    return out


def child_tuneforge(a: argparse.Namespace) -> dict:
    from tuneforge.config import load_config
    from tuneforge.engine.loop import Trainer
    from tuneforge.pipeline import train

    spent = {"fit": 0.0, "eval_save": 0.0, "fit_cpu": 0.0, "eval_save_cpu": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(a.device)
                spent[key] += time.perf_counter() - t0
                spent[key + "_cpu"] += time.process_time() - c0
        return wrapper

    rows: list[int] = []
    fit = Trainer.fit

    def fit_counting(self):
        rows.extend(len(r) for r in self.train_data.columns["input_ids"])
        return fit(self)

    Trainer.fit = timed(fit_counting, "fit")
    Trainer._maybe_eval_and_save = timed(Trainer._maybe_eval_and_save, "eval_save")
    with profiled(a.profile, a.one, a.device, active=PROFILE_STEPS, skip=PROFILE_SKIP) as tick:
        if a.profile:  # the headline runs keep the loop's own _step
            step = Trainer._step
            Trainer._step = lambda self, micro: (step(self, micro), tick())[0]
        m = train(load_config(None, _overrides(a)), overwrite=True, quiet=True).metrics
    loop = spent["fit"] - spent["eval_save"]
    tokens = sum(rows)
    return {"tokens": tokens, "rows": len(rows), "steps": m["train"]["steps"], "loop_s": loop,
            "tokens_per_s": tokens / loop, "precision": m["train"]["precision"],
            "cpu_util": cpu_util(spent["fit_cpu"] - spent["eval_save_cpu"], loop),
            "heldout_loss": m["splits"]["validation"]["loss"]}


def run_child(name: str, a: argparse.Namespace, base_loss: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--work", str(a.work), "--max-length", str(a.max_length),
           "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--train-examples", str(a.train_examples),
           "--seed", str(a.seed), "--device", a.device, *(f"--tuneforge-override={o}" for o in a.tuneforge_override),
           *(["--profile", str(a.profile)] if a.profile else [])]
    if base_loss:
        cmd.append("--base-loss")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-examples", type=int, default=160)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="training seed of every run (LoRA init, dropout, order)")
    p.add_argument("--tuneforge-override", action="append", default=[], metavar="K=V",
                   help="extra tuneforge setting for experiments (repeatable), e.g. train.group_by_length=false")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--profile", metavar="DIR", help="run every training under torch.profiler and write "
                   "DIR/profile-<run>.txt (ops per step and op tables; the timings are then not comparable)")
    p.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--base-loss", action="store_true", help=argparse.SUPPRESS)
    add_device_arg(p)
    a = p.parse_args()
    a.device = pick_device(a.device)
    if a.one:
        if a.one == "trl-no-gc-alloc":
            from tuneforge.engine.allocator import tune_cpu_allocator

            tune_cpu_allocator()
        res = (child_tuneforge(a) if a.one == "tuneforge"
               else child_trl(a, gc=a.one == "trl-default", bf16=a.one != "trl-no-gc-fp32"))
        print("RESULT " + json.dumps(res | {"peak_rss_mib": peak_rss_mib(), "gpu_peak_mib": device_peak_mib(a.device)}))
        return
    if not DATA.is_file():
        sys.exit(f"{DATA} not found (the shared data folder)")
    runs = [r for r in a.runs.split(",") if r]
    if unknown := sorted(set(runs) - set(RUNS)):
        sys.exit(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    from tuneforge.models import resolve_model

    resolve_model("smollm2-135m")  # converts the bundled GGUF once, outside every timing
    print(f"load average at start: {os.getloadavg()[0]:.2f} (timings need an idle machine); device "
          f"{describe_device(a.device)}", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        a.work = Path(tmp)
        info = write_data(a.work, a.train_examples)
        print(f"{info['train_examples']} training examples, {info['heldout_examples']} held out, rows of "
              f"{a.max_length}, batch {a.batch_size}", flush=True)
        for i, name in enumerate(runs):
            r = run_child(name, a, base_loss=i == 0)
            results[name] = r
            if "base_heldout_loss" in r:
                results["base_heldout_loss"] = r["base_heldout_loss"]
                print(f"base model held-out response loss: {r['base_heldout_loss']:.4f}", flush=True)
            print(f"{name:>12}: {r['tokens_per_s']:7.0f} tokens/s ({r['tokens']} tokens in {r['rows']} rows, "
                  f"{r['steps']} steps, {r['loop_s']:.0f} s), held-out loss {r['heldout_loss']:.4f}, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB, GPU {fmt_mib(r['gpu_peak_mib'])} MiB, cpu util {100 * r['cpu_util']:.0f}%", flush=True)
    if a.device == "cpu":
        warn_if_shared({name: results[name]["cpu_util"] for name in runs})
    if "tuneforge" in results:
        for name in ("trl-default", "trl-no-gc", "trl-no-gc-alloc", "trl-no-gc-fp32"):
            if name in results:
                ratio = results["tuneforge"]["tokens_per_s"] / results[name]["tokens_per_s"]
                dl = results["tuneforge"]["heldout_loss"] - results[name]["heldout_loss"]
                print(f"tuneforge / {name}: {ratio:.2f}x tokens/s, held-out loss {dl:+.4f}")
    base = results_path(RESULTS, a.device)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = base if a.seed == 0 else base.with_name(f"{base.stem}-seed{a.seed}.json")
    out.write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k not in ("one", "work")},
                                   "info": info, "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
