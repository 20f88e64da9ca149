"""Benchmark: tuneforge vs the Hugging Face Trainer on the same SST-2 fine-tuning, in one invocation.

Both tools get the identical seeded train/dev subsets (written to temp TSVs), the same model (bundled
MiniLM-L6), batch size, lr 5e-5, linear schedule with the same integer warmup, weight decay 0.01,
max_grad_norm 1.0, max_length 128 with dynamic padding, the same number of optimizer steps and seed.
Each run is a fresh subprocess that reports its own peak RSS and timings as JSON on stdout:

* ``hf-default``: transformers ``Trainer`` at its defaults (fp32, random sampler) + DataCollatorWithPadding.
* ``hf-tuned``:   the same plus ``bf16=True`` and length-grouped sampling.
* ``hf-tuned-alloc``: ``hf-tuned`` in a process given tuneforge's malloc settings (`engine.allocator`),
  to show what part of the ratio is the allocator.
* ``hf-tuned-fp32``: length-grouped sampling without bf16: the best Trainer setting on a CPU where bf16
  matmuls are slower than fp32 ones (AVX512-BF16 without AMX; see `engine.runtime`).
* ``tuneforge``:  ``tuneforge.pipeline.train`` at its defaults (precision auto, group_by_length on,
  fast_dropout on, tune_allocator on).
* ``tuneforge-dense``: the same with ``train.embedding_row_grads=false`` (torch's dense word-embedding
  gradient instead of exact row gradients: what that default saves).
* ``tuneforge-sparse``: the same plus ``train.sparse_embeddings=true`` (row-sparse word-embedding updates).
* ``tuneforge-fp32``: the same with ``train.precision=fp32`` (no autocast; on an H100 the fp32 Trainer was
  2.6x faster than the bf16 one on this small model, see benchmarks/README.md).
* ``tuneforge-bf16``: the same with ``train.precision=bf16`` (what ``auto`` picks only where bf16 measures faster).
* ``tuneforge-compile``: the same plus ``train.compile=blocks`` (regional torch.compile; the time includes compiling).

Headline throughput = training samples / wall time of the training loop (every batch's data loading /
collation, forward, backward, clipping, optimizer and scheduler step, per-step bookkeeping; not model
loading, tokenization, evaluation or checkpointing). See benchmarks/README.md for all definitions.

    python benchmarks/bench_classification.py [--train-rows 8000] [--dev-rows 872] [--steps N] [--batch-size 32]
        [--runs hf-tuned,tuneforge,tuneforge-sparse] [--device auto|cpu|cuda] [--profile DIR]

On CUDA (``--device auto`` picks it when present) every run trains on the GPU (the HF runs without
``use_cpu``), the matmul peak is measured there (8192^3), the clocks wait for the GPU
(``torch.cuda.synchronize``) and the table adds each run's peak GPU memory; results go to
``results/classification-cuda.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    add_device_arg,
    cpu_util,
    device_peak_mib,
    fmt_mib,
    gpu_name,
    peak_rss_mib,
    pick_device,
    profiled,
    results_path,
    synchronize,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "benchmarks" / "results" / "classification.json"
RUNS = ("hf-default", "hf-tuned", "hf-tuned-alloc", "hf-tuned-fp32", "tuneforge", "tuneforge-dense",
        "tuneforge-sparse", "tuneforge-fp32", "tuneforge-bf16", "tuneforge-compile")
TUNEFORGE_EXTRA = {"tuneforge": [], "tuneforge-dense": ["train.embedding_row_grads=false"],
                   "tuneforge-sparse": ["train.sparse_embeddings=true"], "tuneforge-fp32": ["train.precision=fp32"],
                   "tuneforge-bf16": ["train.precision=bf16"], "tuneforge-compile": ["train.compile=blocks"]}
LR, WD, CLIP, MAX_LEN, WARMUP_RATIO = 5e-5, 0.01, 1.0, 128, 0.06


# ----------------------------------------------------------------------------- helpers
def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    """TSV with header ``sentence<TAB>label``, read with quoting off (plain split on tabs)."""
    rows = [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines(True)[1:]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def write_subset(src: Path, dst: Path, n: int, seed: int) -> int:
    """Copy a seeded random sample of ``n`` data lines of ``src`` verbatim (file order kept)."""
    lines = src.read_text(encoding="utf-8").splitlines(True)
    body = lines[1:]
    keep = sorted(random.Random(seed).sample(range(len(body)), min(n, len(body))))
    dst.write_text(lines[0] + "".join(body[i] for i in keep), encoding="utf-8")
    return len(keep)


def samples_for(steps: int, n: int, bs: int) -> int:
    """Examples seen in ``steps`` optimizer steps over ``n`` rows (last batch of an epoch is short)."""
    per_epoch = math.ceil(n / bs)
    full, rest = divmod(steps, per_epoch)
    return full * n + min(rest * bs, n)


# ----------------------------------------------------------------------------- children
def child_peak(a: argparse.Namespace) -> dict:
    """Best-of-N n^3 matmul in fp32 and bf16 on the run's device (n = 2048 on CPU, 8192 on CUDA), plus the
    model's per-token parameter count."""
    import torch
    from transformers import AutoConfig, AutoModel

    from tuneforge.models import resolve_model

    out: dict = {"threads": torch.get_num_threads(), "device": a.device, "gpu": gpu_name(a.device)}
    n = 2048 if a.device == "cpu" else 8192
    out["matmul_n"] = n
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = (torch.randn(n, n, dtype=dtype, device=a.device) for _ in range(2))
        torch.mm(x, y)
        synchronize(a.device)
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            torch.mm(x, y)
            synchronize(a.device)
            best = min(best, time.perf_counter() - t0)
        out[f"matmul_{name}_gflops"] = 2 * n**3 / best / 1e9
    cfg = AutoConfig.from_pretrained(resolve_model("minilm-l6"))
    model = AutoModel.from_config(cfg)
    out["params_total"] = sum(p.numel() for p in model.parameters())
    out["params_encoder"] = sum(p.numel() for p in model.encoder.parameters())
    out.update(n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size)
    return out


def child_hf(a: argparse.Namespace, tuned: bool, tune_allocator: bool = False, bf16: bool = True) -> dict:
    import numpy as np
    import torch
    import transformers as hf
    from datasets import Dataset

    from tuneforge.engine.allocator import tune_cpu_allocator
    from tuneforge.models import resolve_model

    if tune_allocator:
        tune_cpu_allocator()
    path = resolve_model("minilm-l6")
    tok = hf.AutoTokenizer.from_pretrained(path)

    def dataset(p: str) -> Dataset:
        texts, labels = read_tsv(Path(p))
        ds = Dataset.from_dict({"sentence": texts, "label": labels})
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=MAX_LEN), batched=True,
                      remove_columns=["sentence"])

    train_ds, dev_ds = dataset(a.train_file), dataset(a.dev_file)
    hf.set_seed(a.seed)
    model = hf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32,
                                                                  attn_implementation="sdpa")

    class Clock(hf.TrainerCallback):  # loop = on_train_begin..on_train_end; steps = sum of step_begin..step_end
        begin = end = s0 = steps = cpu = 0.0

        def on_train_begin(self, *_, **__):
            self.begin, self.cpu = time.perf_counter(), time.process_time()

        def on_step_begin(self, *_, **__):
            self.s0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.steps += time.perf_counter() - self.s0

        def on_train_end(self, *_, **__):
            synchronize(a.device)
            self.end, self.cpu = time.perf_counter(), time.process_time() - self.cpu

    # use_cpu on CPU: transformers refuses bf16 on a GPU-less box without it
    extra: dict = {"use_cpu": a.device == "cpu"}
    if tuned:
        if bf16:
            extra["bf16"] = True
        if "train_sampling_strategy" in hf.TrainingArguments.__dataclass_fields__:
            extra["train_sampling_strategy"] = "group_by_length"
        else:
            extra["group_by_length"] = True
    args = hf.TrainingArguments(
        output_dir=a.workdir, per_device_train_batch_size=a.batch_size, learning_rate=LR, max_steps=a.steps,
        lr_scheduler_type="linear", warmup_steps=a.warmup, weight_decay=WD, max_grad_norm=CLIP, seed=a.seed,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, **extra,
    )
    clock = Clock()
    trainer = hf.Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                         data_collator=hf.DataCollatorWithPadding(tok), callbacks=[clock])
    t0 = time.perf_counter()
    with profiled(a.profile, a.child, a.device) as tick:
        if a.profile:  # the headline runs carry no extra callback
            trainer.add_callback(type("Tick", (hf.TrainerCallback,), {"on_step_end": lambda *_, **__: tick()}))
        trainer.train()
    train_call = time.perf_counter() - t0
    pred = trainer.predict(dev_ds)
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    samples = samples_for(a.steps, len(train_ds), a.batch_size)
    loop = clock.end - clock.begin
    return {
        "samples": samples, "steps": trainer.state.global_step, "loop_s": loop, "steps_s": clock.steps,
        "train_call_s": train_call, "samples_per_s": samples / loop, "step_only_samples_per_s": samples / clock.steps,
        "cpu_util": cpu_util(clock.cpu, loop),
        "dev_accuracy": acc, "extra_args": extra, "optim": str(args.optim),
    }


def child_tuneforge(a: argparse.Namespace, extra: list[str]) -> dict:

    from tuneforge.config import load_config
    from tuneforge.engine.loop import Trainer
    from tuneforge.pipeline import train

    spent = {"fit": 0.0, "eval_save": 0.0, "fit_cpu": 0.0, "eval_save_cpu": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            synchronize(a.device)
            spent[key] += time.perf_counter() - t0
            spent[key + "_cpu"] += time.process_time() - c0
            return out
        return wrapper

    # Loop wall time without the end-of-training eval/checkpoint, for a like-for-like number with HF.
    Trainer.fit = timed(Trainer.fit, "fit")
    Trainer._maybe_eval_and_save = timed(Trainer._maybe_eval_and_save, "eval_save")
    cfg = load_config(None, [
        "model=minilm-l6", f"data.train={a.train_file}", f"data.validation={a.dev_file}", "data.quoting=false",
        "data.text_column=sentence", "data.label_column=label", f"data.max_length={MAX_LEN}",
        f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}", f"train.lr={LR}",
        f"train.warmup_steps={a.warmup}", f"train.weight_decay={WD}", f"train.max_grad_norm={CLIP}",
        f"train.seed={a.seed}", "train.tensorboard=false", f"train.device={a.device}", f"output_dir={a.workdir}",
        *extra,
    ])
    with profiled(a.profile, a.child, a.device) as tick:
        if a.profile:  # the headline runs keep the loop's own _step
            step = Trainer._step
            Trainer._step = lambda self, micro: (step(self, micro), tick())[0]
        m = train(cfg, overwrite=True, quiet=True).metrics
    tr = m["train"]
    samples = round(tr["train_samples_per_s"] * tr["train_seconds"])
    loop = spent["fit"] - spent["eval_save"]
    return {
        "samples": samples, "steps": tr["steps"], "loop_s": loop, "steps_s": tr["train_seconds"],
        "samples_per_s": samples / loop, "step_only_samples_per_s": tr["train_samples_per_s"],
        "tokens_per_s": tr["train_tokens_per_s"], "precision": tr["precision"],
        "dev_accuracy": m["splits"]["validation"]["accuracy"], "eval_save_s": spent["eval_save"],
        "cpu_util": cpu_util(spent["fit_cpu"] - spent["eval_save_cpu"], loop),
    }


def run_child(name: str, a: argparse.Namespace, work: Path) -> dict:
    wd = work / name
    wd.mkdir()
    cmd = [sys.executable, __file__, "--child", name, "--train-file", str(work / "train.tsv"), "--dev-file",
           str(work / "dev.tsv"), "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size",
           str(a.batch_size), "--seed", str(a.seed), "--workdir", str(wd), "--device", a.device,
           *(["--profile", str(a.profile)] if a.profile else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "TUNEFORGE_CACHE": str(work / "cache")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {name} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- parent
def report(a: argparse.Namespace, res: dict, peak: dict) -> dict:
    """Print the table, the ratios of every tuneforge run to every HF run present, and MFU; returns the summary."""
    peers = {k: res[n] for k, n in (("default", "hf-default"), ("tuned", "hf-tuned"), ("tuned-alloc", "hf-tuned-alloc"),
                                    ("tuned-fp32", "hf-tuned-fp32")) if n in res}
    ours = [n for n in TUNEFORGE_EXTRA if n in res]
    print(f"\nSST-2 subset: {a.train_rows} train rows, {a.dev_rows} dev rows, {a.steps} optimizer steps, batch "
          f"{a.batch_size}, warmup {a.warmup}, {peak['threads']} torch threads")
    print("samples/s = training samples / training-loop wall time (data + fwd + bwd + clip + optimizer; no load/eval)")
    head = (f"{'run':<17}{'samples/s':>10}{'step-only':>10}" + "".join(f"{'vs hf-' + k:>13}" for k in peers)
            + f"{'RSS MiB':>9}{'GPU MiB':>9}{'dev acc':>9}{'cpu util':>10}")
    print(head + "\n" + "-" * len(head))
    for name, r in res.items():
        ratios = "".join(f"{r['samples_per_s'] / h['samples_per_s']:>12.2f}x" for h in peers.values())
        print(f"{name:<17}{r['samples_per_s']:>10.1f}{r['step_only_samples_per_s']:>10.1f}{ratios}"
              f"{r['peak_rss_mib']:>9.0f}{fmt_mib(r['gpu_peak_mib']):>9}{100 * r['dev_accuracy']:>8.2f}%"
              f"{100 * r['cpu_util']:>9.0f}%")
    if a.device == "cpu" and min(r["cpu_util"] for r in res.values()) < 0.85:
        print("WARNING: cpu util < 85% (process CPU time / (loop wall x threads)): other load shared the cores")
    print()
    summary: dict = {}
    for name in ours:
        tf = res[name]
        for k, h in peers.items():
            target = {"default": 2.0, "tuned": 1.25, "tuned-alloc": 1.25, "tuned-fp32": 1.25}[k]
            speed = tf["samples_per_s"] / h["samples_per_s"]
            step = tf["step_only_samples_per_s"] / h["step_only_samples_per_s"]
            acc, rss = 100 * (tf["dev_accuracy"] - h["dev_accuracy"]), tf["peak_rss_mib"] / h["peak_rss_mib"]
            summary.update({f"{name}_vs_hf_{k}": speed, f"{name}_vs_hf_{k}_step_only": step,
                            f"{name}_acc_diff_vs_hf_{k}_pts": acc, f"{name}_rss_vs_hf_{k}": rss})
            print(f"{name} / hf-{k}: {speed:.2f}x (target >= {target}: {'PASS' if speed >= target else 'FAIL'}; "
                  f"step-only {step:.2f}x) | dev accuracy {acc:+.2f} points (target within 1: "
                  f"{'PASS' if abs(acc) <= 1 else 'FAIL'}) | peak RSS {tf['peak_rss_mib']:.0f} vs "
                  f"{h['peak_rss_mib']:.0f} MiB ({rss:.2f}x)")
    for name in ("hf-default", "hf-tuned", "hf-tuned-alloc", "hf-tuned-fp32"):
        if name in res:
            r = res[name]
            print(f"{name}: {1000 * r['loop_s'] / r['steps']:.0f} ms/step loop, {1000 * r['steps_s'] / r['steps']:.0f} "
                  f"ms/step inside on_step_begin..end, {1000 * (r['loop_s'] - r['steps_s']) / r['steps']:.1f} ms/step "
                  f"outside (data loading + bookkeeping); trainer.train() {r['train_call_s']:.1f}s vs loop {r['loop_s']:.1f}s")
    where = peak["gpu"] or "CPU"
    print(f"\nmatmul peak {peak['matmul_n']}^3 on {where}: fp32 {peak['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 {peak['matmul_bf16_gflops']:.0f} "
          f"GFLOP/s (best of 7)")
    for name in ours:
        tf = res[name]
        print(f"{name}: {1000 * tf['loop_s'] / tf['steps']:.0f} ms/step loop, {1000 * tf['steps_s'] / tf['steps']:.0f} "
              f"ms/step in _step (collate+fwd+bwd+optimizer)")
        # MFU: 6 * N * tokens/s, N = encoder parameters (embeddings and the once-per-sequence pooler/head
        # excluded); attention score/value matmuls add 12 * L * T * d per token (T = mean real length).
        tok_s, mean_len = tf["tokens_per_s"], tf["tokens_per_s"] / tf["step_only_samples_per_s"]
        dense = 6 * peak["params_encoder"] * tok_s
        attn = 12 * peak["n_layers"] * mean_len * peak["hidden"] * tok_s
        # against the peak of the precision the run computed in (bf16 autocast or fp32)
        prec = "bf16" if tf["precision"] == "bf16" else "fp32"
        top = peak[f"matmul_{prec}_gflops"] * 1e9
        mfu, mfu_attn = dense / top, (dense + attn) / top
        summary.update({f"{name}_mfu_dense": mfu, f"{name}_mfu_with_attention": mfu_attn,
                        f"{name}_mean_tokens": mean_len, f"{name}_mfu_peak": prec})
        print(f"  {tok_s:.0f} real tokens/s (mean {mean_len:.1f} tokens/example), N_encoder = "
              f"{peak['params_encoder'] / 1e6:.2f}M of {peak['params_total'] / 1e6:.2f}M params; 6*N*tok/s = "
              f"{dense / 1e9:.1f} GFLOP/s -> MFU {100 * mfu:.1f}% of the {prec} peak ({100 * mfu_attn:.1f}% with "
              f"attention; precision {tf['precision']})")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--dev-rows", type=int, default=872)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1 epoch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--child", choices=("peak", *RUNS), help=argparse.SUPPRESS)
    for hidden in ("--train-file", "--dev-file", "--workdir"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile", metavar="DIR", help="run every training under torch.profiler and write "
                   "DIR/profile-<run>.txt (ops and kernel launches per step; the timings are then not comparable)")
    add_device_arg(p)
    a = p.parse_args()
    a.runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if bad := [r for r in a.runs if r not in RUNS]:
        p.error(f"--runs: unknown {bad}; allowed: {', '.join(RUNS)}")
    a.device = pick_device(a.device)
    if a.child:
        fn = {"peak": child_peak, "hf-default": lambda x: child_hf(x, False), "hf-tuned": lambda x: child_hf(x, True),
              "hf-tuned-alloc": lambda x: child_hf(x, True, tune_allocator=True),
              "hf-tuned-fp32": lambda x: child_hf(x, True, bf16=False),
              **{k: (lambda x, e=e: child_tuneforge(x, e)) for k, e in TUNEFORGE_EXTRA.items()}}[a.child]
        out = fn(a)
        out["peak_rss_mib"], out["gpu_peak_mib"] = peak_rss_mib(), device_peak_mib(a.device)
        print(json.dumps(out))
        return
    load = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load:.2f}" + ("  WARNING: machine busy, numbers may be off" if load > 1.5 else ""))
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        work = Path(tmp)
        a.train_rows = write_subset(DATA / "train.tsv", work / "train.tsv", a.train_rows, a.seed)
        a.dev_rows = write_subset(DATA / "dev.tsv", work / "dev.tsv", a.dev_rows, a.seed)
        a.steps = a.steps or math.ceil(a.train_rows / a.batch_size)
        a.warmup = round(WARMUP_RATIO * a.steps)
        res = {}
        for name in ("peak", *a.runs):
            print(f"running {name} ...", flush=True)
            res[name] = run_child(name, a, work)
            if name != "peak":
                r = res[name]
                print(f"  {r['samples_per_s']:.1f} samples/s, dev acc {r['dev_accuracy']:.4f}, "
                      f"RSS {r['peak_rss_mib']:.0f} MiB, process {r['process_s']:.0f}s", flush=True)
    peak = res.pop("peak")
    summary = report(a, res, peak)
    out = results_path(RESULTS, a.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu, "cores": os.cpu_count(), "load_at_start": load,
        "device": a.device, "gpu": peak["gpu"],
        "settings": {k: getattr(a, k) for k in ("train_rows", "dev_rows", "steps", "warmup", "batch_size", "seed")}
        | {"lr": LR, "weight_decay": WD, "max_grad_norm": CLIP, "max_length": MAX_LEN},
        "peak": peak, "runs": res, "summary": summary,
    }, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
