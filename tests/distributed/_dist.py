"""What the distributed tests share: a tiny model without dropout, data, and runs under torchrun (2 CPU
processes, gloo) or in one process, each with a timeout so that a deadlock fails the test instead of hanging."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from _common import cli_env, sentiment_rows, write_csv  # noqa: E402

TIMEOUT = 600  # seconds per launch: a tiny run takes ~15 s idle, but 300+ s were measured on the 2 shared cores
# under a load average of 12-16 (interpreter start and imports); a hang still fails here
# embedding_row_grads off: ranks take the dense embedding gradient (row gradients are single-process), so the
# one-process references here must too; the two paths agree to float rounding only, which lr 1e-2 over 16 steps
# grows past these tests' 5e-5 bounds (tests/unit/test_sparse_embeddings.py bounds that difference itself)
COMMON = ["data.train=train.csv", "data.validation=val.csv", "train.precision=fp32", "train.log_steps=1",
          "train.lr=1e-2", "train.tensorboard=false", "train.embedding_row_grads=false"]
ARGS = ["model=bert", *COMMON, "train.max_steps=16", "train.save_steps=4", "train.eval_steps=100"]


def env() -> dict[str, str]:
    e = cli_env()
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    return e


def no_dropout_model(name: str, dest: Path) -> Path:
    """A copy of tiny model ``name`` with every dropout at 0, so runs that consume RNG differently (one process
    vs two) compute the same function."""
    from tuneforge.models.registry import resolve_model

    src = resolve_model(name)
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    for k in list(cfg):
        if "dropout" in k and isinstance(cfg[k], (int, float)):
            cfg[k] = 0.0
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def classification_data(d: Path, n: int = 48) -> None:
    write_csv(d / "train.csv", sentiment_rows(n))
    write_csv(d / "val.csv", sentiment_rows(12, offset=200))


def sft_data(d: Path, n: int = 32) -> None:
    rows = [{"instruction": f"say {w} {i}", "output": f"{w} " * (1 + i % 5)} for i, w in
            enumerate(["yes", "no", "maybe", "ok"] * (n // 4))]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))


LORA = ["method=lora", "method.dropout=0", "method.r=4"]


def case_args(task: str, method: str, precision: str, accum: int, steps: int = 8) -> list[str]:
    """The overrides of one parity case (per-rank batch and output_dir left to the caller): classification on the
    dropout-free tiny BERT (``bert/``, ``train.csv``) or SFT on the tiny Llama (``llama/``, ``train.jsonl``), full
    fine-tuning or LoRA, at lr 1e-2, a checkpoint every 4 steps, evaluation only at the end."""
    data = (["model=bert", "data.train=train.csv", "data.validation=val.csv"] if task == "classification" else
            ["model=llama", "task=sft", "data.train=train.jsonl", "data.validation=val.jsonl"])
    return [*data, *(LORA if method == "lora" else []), f"train.max_steps={steps}", "train.save_steps=4",
            f"train.grad_accum={accum}", f"train.precision={precision}", "train.lr=1e-2", "train.log_steps=1",
            "train.tensorboard=false", "train.eval_steps=100"]


def rel_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors."""
    num = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in a)
    return (num / sum(float(a[k].double().norm()) ** 2 for k in a)) ** 0.5


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(cmd: list[str], cwd: Path, check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_together(cmds: list[list[str]], cwd: Path, timeout: float) -> list[str]:
    """Start every command at once and wait for all (each must exit 0 within ``timeout`` seconds of the start);
    returns their outputs (stdout and stderr)."""
    logs = [cwd / f".together-{i}.log" for i in range(len(cmds))]
    procs = []
    for cmd, log in zip(cmds, logs, strict=True):
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:  # torchrun's workers have sessions of their own: killed one by one
                for pid in _descendants(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outs = [log.read_text() for log in logs]
    for cmd, proc, out in zip(cmds, procs, outs, strict=True):
        assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode} (timeout {timeout} s)\n{out[-8000:]}"
    return outs


MATRIX_WORKER = str(Path(__file__).with_name("_matrix_worker.py"))


def one_process_name(task: str, method: str, precision: str, accum: int) -> str:
    """The run directory of a case's one-process reference run."""
    return f"{task}-{method}-{accum}-{precision}-1"


def matrix_inputs(d: Path) -> None:
    """What every matrix case trains on: 64 classification rows, the SFT rows, tiny-bert and tiny-llama
    without dropout (so one process and two ranks can agree to the last digit)."""
    classification_data(d, 64)
    sft_data(d)
    no_dropout_model("tiny-bert", d / "bert")
    no_dropout_model("tiny-llama", d / "llama")


def launch_against_one_process(d: Path, cases: list[tuple], twos: list, timeout: float) -> None:
    """Train, at once, every case's one-process references (batch 4, at its precision and in fp32, named
    `one_process_name`) in one process and ``twos`` (worker entries) in one 2-rank torchrun launch."""
    refs: dict[str, list[str]] = {}
    for task, method, precision, accum, *_ in cases:
        for p in dict.fromkeys([precision, "fp32"]):
            refs[one_process_name(task, method, p, accum)] = case_args(task, method, p, accum)
    (d / "refs.json").write_text(json.dumps([[*a, f"output_dir={n}", "train.batch_size=4"] for n, a in refs.items()]))
    (d / "twos.json").write_text(json.dumps(twos))
    outs = run_together([[sys.executable, MATRIX_WORKER, "refs.json"], torchrun_cmd(2, MATRIX_WORKER, "twos.json")],
                        d, timeout)
    print("one process:\n" + outs[0][-3000:] + "\ntwo ranks:\n" + outs[1][-3000:])


def train(cwd: Path, nproc: int, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``tuneforge train OVERRIDES`` in one process (nproc=1, no launcher) or under torchrun."""
    args = ["train", *overrides, *flags]
    cmd = [sys.executable, "-m", "tuneforge", *args] if nproc == 1 else torchrun_cmd(nproc, "-m", "tuneforge", *args)
    return run(cmd, cwd)


def last_weights(run_dir: Path) -> dict:
    """The trainable weights of the run's last checkpoint (an FSDP one is converted from its DCP shards)."""
    import tempfile

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    if not (last / ".metadata").is_file():
        return load_file(str(last / "trainable.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(last), f"{tmp}/ckpt.pt")
        return torch.load(f"{tmp}/ckpt.pt", weights_only=False)["model"]


def ranks_of(run_dir: Path) -> int:
    """How many processes wrote the run's last checkpoint: its FSDP shard files, else its per-rank RNG states
    (``rng-ranks.pt``, written only at world size > 1)."""
    import torch

    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    if (last / ".metadata").is_file():
        return len(list(last.glob("*.distcp")))
    per_rank = last / "rng-ranks.pt"
    return len(torch.load(per_rank, weights_only=False)) if per_rank.is_file() else 1


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train" and "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return [k for kid in kids for k in (kid, *_descendants(kid))]


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in environ:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def complete_checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "state.json").is_file())


def kill_rank_after_checkpoint(cwd: Path, run_dir: Path, kill_rank: int, min_step: int, *args: str) -> int:
    """Start ``tuneforge train ARGS`` under torchrun (2 processes); SIGKILL the worker of ``kill_rank`` once a
    complete checkpoint at step >= ``min_step`` exists; returns the launcher's exit code."""
    proc = subprocess.Popen(torchrun_cmd(2, "-m", "tuneforge", "train", *args), cwd=cwd, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            assert proc.poll() is None, f"training ended (rc={proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "no checkpoint in time"
            if [s for s in complete_checkpoints(run_dir) if s >= min_step]:
                victims = [p for p in _children(proc.pid) if _rank_of(p) == kill_rank]
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    break
            time.sleep(0.02)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


FP32_WEIGHTS, FP32_LOSSES, BF16_LOSSES = 5e-5, 1e-4, 1e-2


def assert_matches_one_process(one_dir: Path, two_dir: Path, fp32_dir: Path, precision: str, label: str) -> None:
    """The 2-rank run ``two_dir`` ended where the one-process run ``one_dir`` did: in fp32 weights within
    ``FP32_WEIGHTS`` and losses within ``FP32_LOSSES`` (relative); in bf16 the weight gap under half of what
    bf16 itself moves the one-process run away from its fp32 twin ``fp32_dir``, losses within ``BF16_LOSSES``."""
    import pytest

    one, two = last_weights(one_dir), last_weights(two_dir)
    losses_one, losses_two = train_losses(one_dir), train_losses(two_dir)
    if precision == "fp32":
        diff = max_diff(one, two)
        print(f"{label} fp32: max |w1 - w2| = {diff:.2e}")
        assert diff < FP32_WEIGHTS
        assert losses_two == pytest.approx(losses_one, rel=FP32_LOSSES)
    else:
        dist, bf16 = rel_distance(one, two), rel_distance(one, last_weights(fp32_dir))
        print(f"{label} bf16: |w1 - w2| / |w1| = {dist:.2e}; one process bf16 vs fp32: {bf16:.2e}")
        assert dist < 0.5 * bf16
        assert losses_two == pytest.approx(losses_one, rel=BF16_LOSSES)
