"""Benchmark: data-parallel scaling of tuneforge training, samples/s at 1, 2, ... processes.

Every run trains the same model on the same seeded SST-2 subset for the same number of optimizer steps at
the same *global* batch (``--global-batch``; each of N processes gets ``global / N`` rows per micro-batch), so
every run does the same arithmetic and sees the same batches in the same order (`engine.distributed`).
N = 1 is a plain ``python -m tuneforge train``; N > 1 is ``torchrun --standalone --nproc-per-node N -m
tuneforge train`` (DDP; gloo on CPUs, nccl on GPUs, one GPU per process when CUDA is present).

On CPUs the cores are split between the processes (``OMP_NUM_THREADS = cores // N``), so the comparison
is "the same machine used as one process or as N"; on a 2-core CPU expect little: both ways use the
same two cores, and DDP adds a gradient all-reduce per step. On a machine shared with other jobs, several
threads per process spin against them and one process with 2 threads can be far slower than it would be
alone; ``--threads 1`` compares 1 process on 1 core with N processes on N cores instead. On GPUs each process owns a GPU and the
number to read is the speed-up at N GPUs.

Throughput = global training samples / rank 0's wall time of the training loop (``train_samples_per_s``
in metrics.json: forward, backward, all-reduce, optimizer; not loading, evaluation or checkpoints).

    python benchmarks/bench_scaling.py [--nprocs 1,2] [--model minilm-l6] [--rows 2048] [--steps 40]
                                       [--global-batch 32] [--precision auto] [--device auto] [--threads T]
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"


def write_subset(src: Path, dst: Path, n: int, seed: int = 42) -> None:
    lines = src.read_text(encoding="utf-8").splitlines(True)
    keep = sorted(random.Random(seed).sample(range(1, len(lines)), min(n, len(lines) - 1)))
    dst.write_text(lines[0] + "".join(lines[i] for i in keep), encoding="utf-8")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(nproc: int, work: Path, args: argparse.Namespace) -> dict:
    if args.global_batch % nproc:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {nproc} processes")
    out = work / f"run-{nproc}"
    overrides = [f"model={args.model}", f"data.train={work / 'train.tsv'}", "data.validation=" + str(work / "dev.tsv"),
                 "data.text_column=sentence", "data.label_column=label", "data.quoting=false",
                 f"train.batch_size={args.global_batch // nproc}", f"train.max_steps={args.steps}",
                 f"train.precision={args.precision}", f"train.device={args.device}", "train.eval_steps=100000",
                 "train.tensorboard=false", "train.load_best_at_end=false", f"output_dir={out}"]
    tuneforge = ["-m", "tuneforge", "train", *overrides, "--overwrite", "--quiet"]
    if nproc == 1:
        cmd = [sys.executable, *tuneforge]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *tuneforge]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads or max(1, cores() // nproc))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    train = json.loads((out / "metrics.json").read_text())["train"]
    return {"processes": nproc, "threads_per_process": env["OMP_NUM_THREADS"], "device": train["device"],
            "precision": train["precision"], "samples_per_s": train["train_samples_per_s"],
            "train_seconds": train["train_seconds"], "wall_seconds": round(wall, 1), "final_loss": train["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nprocs", default="1,2", help="process counts to compare, comma-separated")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--rows", type=int, default=2048, help="SST-2 training rows")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (default cores // N)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_subset(DATA / "train.tsv", work / "train.tsv", args.rows)
        write_subset(DATA / "dev.tsv", work / "dev.tsv", 64)
        rows = [run(int(n), work, args) for n in args.nprocs.split(",")]
    base = rows[0]["samples_per_s"]
    print(f"{args.model}, global batch {args.global_batch}, {args.steps} steps, {cores()} cores")
    print(f"{'procs':>5} {'threads':>7} {'device':>8} {'prec':>5} {'samples/s':>10} {'speed-up':>8} {'loss':>8}")
    for r in rows:
        print(f"{r['processes']:>5} {r['threads_per_process']:>7} {r['device']:>8} {r['precision']:>5} "
              f"{r['samples_per_s']:>10.1f} {r['samples_per_s'] / base:>8.2f} {r['final_loss']:>8.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "cores": cores(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
