"""Benchmark: tuneforge DPO vs TRL 1.16's DPOTrainer on the same pairs and settings, in one invocation.

Both tools get the identical seeded train / held-out pairs of ``../shared/data/preference/dpo_en_demo.json``,
kept only where neither side needs truncation (the two tools truncate differently: TRL cuts the whole sequence,
tuneforge the prompt from the left and the reply from the right), so both score exactly the same tokens. Same
model (bundled SmolLM2-135M-Instruct, its chat template), LoRA r 16 / alpha 32 / dropout 0.05 on every linear
layer, sigmoid loss with beta 0.1, AdamW lr 5e-4 (weight decay 0.01, clip 1.0), constant schedule without warmup,
batch size, steps, seed and precision (bf16 autocast where `precision: auto` finds it faster than fp32). The reference log-probs are
precomputed once by both (TRL: ``precompute_ref_log_probs=True``; tuneforge: its default).

Each run is a fresh subprocess that prints JSON: ``pairs_per_s`` = training pairs / wall time of the training
call (TRL: ``trainer.train()``, which includes its reference pass; tuneforge: the loop, plus the reference pass
timed separately and added, so the two numbers cover the same work), and ``heldout_loss``, the sigmoid DPO loss
on the held-out pairs from each tool's own evaluation, and the process's peak RSS. The ratio tuneforge / TRL is
printed per seed and on average.

    python benchmarks/bench_dpo.py [--pairs 48] [--eval-pairs 16] [--steps 6] [--batch-size 4] [--max-length 160]
                                   [--seeds 0 1 2] [--model smollm2-135m] [--tools trl,tuneforge]
                                   [--tuneforge-override train.chunked_cross_entropy=false ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mib

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "preference" / "dpo_en_demo.json"
RESULTS = ROOT / "benchmarks" / "results" / "dpo.json"
LR, BETA, R, ALPHA, DROPOUT, WD, CLIP = 5e-4, 0.1, 16, 32, 0.05, 0.01, 1.0


def select_pairs(model: str, n_train: int, n_eval: int, max_length: int, seed: int, out: Path) -> tuple[Path, Path, Path]:
    """Seeded pairs whose rendered prompt + reply fits ``max_length`` on both sides; writes tuneforge's and TRL's files."""
    from transformers import AutoTokenizer

    from tuneforge.data.preference import read_preferences
    from tuneforge.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    prefs = read_preferences(DATA, invalid="skip", paired=True)

    def length(p, reply: str) -> int:
        msgs = [*p.prompt, {"role": "assistant", "content": reply}]
        return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))

    fits = [p for p in prefs.items if max(length(p, p.chosen), length(p, p.rejected)) <= max_length - 2
            and len(tok.apply_chat_template(p.prompt, tokenize=True, add_generation_prompt=True,
                                            return_dict=False)) <= max_length // 2]
    if len(fits) < n_train + n_eval:
        raise SystemExit(f"only {len(fits)} pairs fit max_length={max_length}; ask for fewer or raise it")
    picked = random.Random(seed).sample(fits, n_train + n_eval)
    paths = (out / "train.jsonl", out / "eval.jsonl", out / "trl-train.jsonl")
    tf = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in picked]
    trl = [{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}]} for p in picked]
    paths[0].write_text("".join(json.dumps(r) + "\n" for r in tf[:n_train]), encoding="utf-8")
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in tf[n_train:]), encoding="utf-8")
    paths[2].write_text("".join(json.dumps(r) + "\n" for r in trl), encoding="utf-8")
    return paths


def _rows(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def run_tuneforge(a: argparse.Namespace) -> dict:
    import tuneforge.objectives.preference_lm as plm
    from tuneforge.config import load_config
    from tuneforge.pipeline import train

    ref_seconds = [0.0]
    real = plm.PreferenceLMObjective.precompute_reference

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = real(self, *args, **kwargs)
        ref_seconds[0] += time.perf_counter() - t0
        return out

    plm.PreferenceLMObjective.precompute_reference = timed
    run = load_config(None, [
        f"model={a.model}", "task=dpo", f"task.beta={BETA}", f"task.max_prompt_length={a.max_length // 2}",
        "method=lora", f"method.r={R}", f"method.alpha={ALPHA}", f"method.dropout={DROPOUT}",
        "method.target_modules=all-linear", f"data.train={a.train}", f"data.validation={a.eval}",
        f"data.max_length={a.max_length}", f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}",
        f"train.lr={LR}", f"train.weight_decay={WD}", f"train.max_grad_norm={CLIP}", "train.schedule=constant",
        "train.warmup_steps=0", f"train.seed={a.seed}", f"train.eval_steps={a.steps}", "train.tensorboard=false",
        "train.group_by_length=false", "extensions=[{name: samples, enabled: false}]",
        f"output_dir={a.work / 'tuneforge'}", *a.tuneforge_override])
    res = train(run, overwrite=True, quiet=True)
    m = res.metrics
    # the reference pass over the eval split is evaluation work: count only the training split's share
    n_train, n_eval = _rows(a.train), _rows(a.eval)
    ref_train = ref_seconds[0] * n_train / (n_train + n_eval)
    pairs = a.steps * a.batch_size
    seconds = m["train"]["train_seconds"] + ref_train
    return {"tool": "tuneforge", "pairs_per_s": pairs / seconds, "train_seconds": seconds,
            "heldout_loss": m["splits"]["validation"]["loss"], "precision": m["train"]["precision"],
            "peak_rss_mib": peak_rss_mib()}


def run_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tuneforge.engine.runtime import resolve_precision
    from tuneforge.models import resolve_model

    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = load_dataset("json", data_files=str(a.trl), split="train")
    n_train = a.steps * a.batch_size
    train_rows = rows.select(range(_rows(a.train)))
    eval_rows = rows.select(range(len(train_rows), len(rows)))
    bf16 = resolve_precision("auto", "cpu") == "bf16"
    args = DPOConfig(
        output_dir=str(a.work / "trl"), per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=2 * a.batch_size,
        max_steps=a.steps, learning_rate=LR, weight_decay=WD, max_grad_norm=CLIP, lr_scheduler_type="constant",
        warmup_steps=0, beta=BETA, loss_type=["sigmoid"], max_length=a.max_length, precompute_ref_log_probs=True,
        bf16=bf16, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", eval_strategy="no", seed=a.seed,
        dataloader_num_workers=0, disable_dropout=False, optim="adamw_torch_fused")
    peft = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                         processing_class=tok, peft_config=peft)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    loss = trainer.evaluate()["eval_loss"]
    return {"tool": "trl", "pairs_per_s": n_train / seconds, "train_seconds": seconds, "heldout_loss": loss,
            "precision": "bf16" if bf16 else "fp32", "peak_rss_mib": peak_rss_mib()}


def _child(a: argparse.Namespace) -> None:
    out = run_tuneforge(a) if a.child == "tuneforge" else run_trl(a)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--eval-pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tools", default="trl,tuneforge", help="comma-separated: trl, tuneforge")
    p.add_argument("--tuneforge-override", action="append", default=[], metavar="K=V",
                   help="extra tuneforge config overrides (repeatable)")
    p.add_argument("--child", choices=["tuneforge", "trl"], help=argparse.SUPPRESS)
    for name in ("train", "eval", "trl", "work"):
        p.add_argument(f"--{name}", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a)
        return
    tools = [t for t in ("trl", "tuneforge") if t in a.tools.split(",")]
    if not tools or set(a.tools.split(",")) - {"trl", "tuneforge"}:
        raise SystemExit(f"--tools takes trl and/or tuneforge, got {a.tools!r}")
    results = []
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            train, evals, trl = select_pairs(a.model, a.pairs, a.eval_pairs, a.max_length, seed, work)
            row = {"seed": seed}
            for tool in tools:
                cmd = [sys.executable, __file__, "--child", tool, "--model", a.model, "--steps", str(a.steps),
                       "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--seed", str(seed),
                       "--train", str(train), "--eval", str(evals), "--trl", str(trl), "--work", str(work),
                       *(f"--tuneforge-override={o}" for o in a.tuneforge_override)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise SystemExit(f"{tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                row[tool] = json.loads(lines[-1][len("RESULT "):])
            if len(tools) == 2:
                row["speed_ratio"] = row["tuneforge"]["pairs_per_s"] / row["trl"]["pairs_per_s"]
            results.append(row)
            print(f"seed {seed}: " + " | ".join(
                f"{t} {row[t]['pairs_per_s']:.3f} pairs/s, held-out loss {row[t]['heldout_loss']:.4f}, "
                f"peak RSS {row[t]['peak_rss_mib']:.0f} MiB" for t in tools)
                + (f" | ratio {row['speed_ratio']:.2f}x" if "speed_ratio" in row else ""), flush=True)
    mean = None
    if len(tools) == 2:
        mean = sum(r["speed_ratio"] for r in results) / len(results)
        print(f"tuneforge / TRL pairs/s: {mean:.2f}x (mean over {len(results)} seeds)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k in
                                                ("model", "pairs", "eval_pairs", "steps", "batch_size", "max_length",
                                                 "tools", "tuneforge_override")},
                                   "runs": results, "mean_speed_ratio": mean}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
