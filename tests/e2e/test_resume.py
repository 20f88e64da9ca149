"""Crash and resume: SIGKILL a training run after it wrote a checkpoint and moved on, `--resume` it, and
compare with the same run done in one go: same final weights, same per-step losses, no duplicated steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _common import CACHE, cli, cli_env, sentiment_rows, write_csv

from tuneforge.engine.runtime import cpu_has_bf16

pytestmark = pytest.mark.e2e


MAX_STEPS = 60
KILL_AFTER_CHECKPOINT = 25  # kill once a checkpoint at or after this step is complete...
PROGRESS_PAST = 2  # ...and training has logged at least this many steps beyond it


def train_args(run: Path, precision: str) -> list[str]:
    # lr is large for a tiny model so that any divergence between the two runs shows in the weights;
    # dropout stays on (train mode), so the restored RNG state matters.
    return [
        "train",
        "model=tiny-bert",
        "data.train=train.csv",
        "data.validation=val.csv",
        f"output_dir={run}",
        f"train.max_steps={MAX_STEPS}",
        "train.save_steps=5",
        "train.eval_steps=20",
        "train.batch_size=8",
        "train.log_steps=1",
        "train.lr=1e-2",
        f"train.precision={precision}",
    ]


def complete_checkpoints(run: Path) -> list[int]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        if p.name.startswith("step-") and (p / "state.json").is_file():
            steps.append(int(p.name.removeprefix("step-")))
    return sorted(steps)


def logged_train_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written right now
        if rec.get("split") == "train":
            steps.append(rec["step"])
    return steps


def records(run: Path) -> list[dict]:
    return [
        json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line
    ]


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb)
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def kill_when_past_checkpoint(args: list[str], run: Path, cwd: Path, log_name: str, min_step: int,
                              past: int = PROGRESS_PAST) -> int:
    """Start ``tuneforge ARGS``, SIGKILL it once a complete checkpoint at step >= ``min_step`` exists and training
    has logged ``past`` steps beyond it; returns that checkpoint's step."""
    log = (cwd / log_name).open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", *args], cwd=cwd, env=cli_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"training ended (rc={proc.returncode}) before it could be killed; see {log.name}")
            if time.monotonic() > deadline:
                pytest.fail("training made no progress in time")
            ckpts = [s for s in complete_checkpoints(run) if s >= min_step]
            logged = logged_train_steps(run)
            if ckpts and logged and max(logged) >= ckpts[-1] + past:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    return complete_checkpoints(run)[-1]


def kill_after_checkpoint(run: Path, precision: str, cwd: Path) -> tuple[int, int]:
    """Start training, SIGKILL it once it has passed a complete checkpoint; returns (ckpt step, last logged step)."""
    step = kill_when_past_checkpoint(train_args(run, precision), run, cwd, f"killed-{precision}.log",
                                     KILL_AFTER_CHECKPOINT)
    last = max(logged_train_steps(run))
    assert last < MAX_STEPS, "the run got to the end before the kill"
    return step, last


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume")
    write_csv(d / "train.csv", sentiment_rows(96))
    write_csv(d / "val.csv", sentiment_rows(30, offset=96))
    return d


@pytest.fixture(scope="module", params=[
    pytest.param("bf16", marks=pytest.mark.skipif(not cpu_has_bf16(), reason="no native bf16 on this CPU")), "fp32"])
def runs(request, workdir):
    """(resumed run dir, uninterrupted run dir, info) for one precision setting."""
    precision = request.param
    resumed = workdir / f"resumed-{precision}"
    ckpt_step, last_logged = kill_after_checkpoint(resumed, precision, workdir)
    assert not (resumed / "metrics.json").exists() and not (resumed / "model").exists()

    # What a kill during a checkpoint write leaves: a temp folder (and possibly an aside '.old-' copy) next to
    # the real checkpoints. Make them look tempting (a later step, a state.json) -- resume must ignore them.
    ckpt_root = resumed / "checkpoints"
    real = ckpt_root / f"step-{ckpt_step:08d}"
    for fake in (f".step-{99:08d}.tmp-4242-deadbeef", f".step-{98:08d}.old-4242-deadbeef"):
        shutil.copytree(real, ckpt_root / fake)
        state = json.loads((ckpt_root / fake / "state.json").read_text(encoding="utf-8"))
        state["step"] = 99
        (ckpt_root / fake / "state.json").write_text(json.dumps(state), encoding="utf-8")
        (ckpt_root / fake / "trainable.safetensors").write_bytes(b"garbage")
    # an incomplete visible folder (no state.json) must not be picked either
    (ckpt_root / f"step-{97:08d}").mkdir()
    (ckpt_root / f"step-{97:08d}" / "trainable.safetensors").write_bytes(b"half")

    resume_proc = cli(*train_args(resumed, precision), "--resume", cwd=workdir)
    reference = workdir / f"reference-{precision}"
    cli(*train_args(reference, precision), cwd=workdir)
    return (
        resumed,
        reference,
        {"ckpt_step": ckpt_step, "last_logged": last_logged, "resume": resume_proc, "precision": precision},
    )


def test_resume_starts_from_last_complete_checkpoint(runs):
    _, _, info = runs
    out = info["resume"].stdout
    assert f"resumed from step {info['ckpt_step']} of {MAX_STEPS}" in out, out
    assert info["ckpt_step"] < info["last_logged"]
    assert "Traceback" not in info["resume"].stderr


def test_resumed_weights_equal_uninterrupted(runs):
    resumed, reference, _ = runs
    assert (
        max_abs_diff(resumed / "model" / "model.safetensors", reference / "model" / "model.safetensors")
        <= 1e-6
    )
    last = f"step-{MAX_STEPS:08d}"
    assert (
        max_abs_diff(
            resumed / "checkpoints" / last / "trainable.safetensors",
            reference / "checkpoints" / last / "trainable.safetensors",
        )
        <= 1e-6
    )
    # and training moved the weights far from their initial values (so equality is not vacuous)
    from safetensors.torch import load_file

    from tuneforge.models.tiny import tiny_model_path

    final = load_file(str(reference / "checkpoints" / last / "trainable.safetensors"))
    init = load_file(str(tiny_model_path("bert", cache_dir=CACHE) / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    assert float((final[key] - init[key]).abs().max()) > 1e-3


def test_resumed_metrics_have_each_step_once_and_match(runs):
    resumed, reference, _ = runs
    got, ref = records(resumed), records(reference)
    got_train = [r for r in got if r["split"] == "train"]
    ref_train = [r for r in ref if r["split"] == "train"]
    steps = [r["step"] for r in got_train]
    assert len(steps) == len(set(steps)), "duplicated train steps after resume"
    assert steps == list(range(1, MAX_STEPS + 1))
    assert [r["step"] for r in ref_train] == steps
    for g, r in zip(got_train, ref_train, strict=True):
        assert abs(g["loss"] - r["loss"]) <= 1e-6, (g["step"], g["loss"], r["loss"])
        assert abs(g["lr"] - r["lr"]) <= 1e-12
    got_eval = [r for r in got if r["split"] == "eval"]
    ref_eval = [r for r in ref if r["split"] == "eval"]
    assert [r["step"] for r in got_eval] == [r["step"] for r in ref_eval] == [20, 40, 60]
    for g, r in zip(got_eval, ref_eval, strict=True):
        assert abs(g["loss"] - r["loss"]) <= 1e-6 and g["accuracy"] == r["accuracy"]

    mg = json.loads((resumed / "metrics.json").read_text(encoding="utf-8"))
    mr = json.loads((reference / "metrics.json").read_text(encoding="utf-8"))
    assert mg["train"]["steps"] == mr["train"]["steps"] == MAX_STEPS
    assert mg["train"]["best_step"] == mr["train"]["best_step"]
    assert abs(mg["train"]["final_loss"] - mr["train"]["final_loss"]) <= 1e-6
    assert mg["splits"]["validation"]["accuracy"] == mr["splits"]["validation"]["accuracy"]
    assert abs(mg["splits"]["validation"]["loss"] - mr["splits"]["validation"]["loss"]) <= 1e-6


def test_resume_ignores_temp_and_incomplete_checkpoints(runs):
    resumed, _, _ = runs
    ckpts = complete_checkpoints(resumed)
    assert 99 not in ckpts and 98 not in ckpts and 97 not in ckpts
    assert MAX_STEPS in ckpts


def test_each_epoch_gets_its_own_batch_order(workdir, monkeypatch):
    """Regression: the loop once reused epoch 0's batch plan for every epoch, so a run resumed in epoch e >= 1
    (which plans epoch e afresh) trained on other batches than the uninterrupted run."""
    import hashlib

    from tuneforge.config import load_config
    from tuneforge.objectives.classification import ClassificationObjective
    from tuneforge.pipeline import train

    monkeypatch.setenv("TUNEFORGE_CACHE", str(CACHE))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(workdir)
    seen: list[str] = []
    original = ClassificationObjective.loss

    def spy(self, model, batch):
        seen.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest())
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationObjective, "loss", spy)
    cfg = load_config(
        None,
        [
            "model=tiny-bert",
            "data.train=train.csv",
            "data.validation=val.csv",
            f"output_dir={workdir / 'epochs'}",
            "train.batch_size=8",
            "train.epochs=2",
            "train.tensorboard=false",
            "train.precision=fp32",
        ],
    )
    train(cfg, quiet=True)
    per_epoch = 96 // 8
    assert len(seen) == 2 * per_epoch
    first, second = seen[:per_epoch], seen[per_epoch:]
    assert second != first, "epoch 1 replayed epoch 0's batch order"


# --------------------------------------------------------------------------- resume with a different config


@pytest.fixture(scope="module")
def mismatched_resume(workdir):
    """A finished run (copied) resumed with a different train.max_steps."""
    src = workdir / "mismatch-src"
    cli(
        "train",
        "model=tiny-bert",
        "data.train=train.csv",
        "data.validation=val.csv",
        f"output_dir={src}",
        "train.max_steps=6",
        "train.save_steps=3",
        "train.batch_size=8",
        "--quiet",
        cwd=workdir,
    )
    before = (src / "config.yaml").read_text(encoding="utf-8")
    proc = cli(
        "train",
        "model=tiny-bert",
        "data.train=train.csv",
        "data.validation=val.csv",
        f"output_dir={src}",
        "train.max_steps=9",
        "train.save_steps=3",
        "train.batch_size=8",
        "--quiet",
        "--resume",
        cwd=workdir,
        check=False,
    )
    return src, before, proc


def test_resume_with_other_total_steps_is_refused(mismatched_resume):
    _, _, proc = mismatched_resume
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "6 total steps" in proc.stderr and "9" in proc.stderr


def test_refused_resume_keeps_config_yaml(mismatched_resume):
    src, before, proc = mismatched_resume
    assert proc.returncode != 0
    assert (src / "config.yaml").read_text(encoding="utf-8") == before


def test_refused_resume_is_a_config_error(mismatched_resume):
    _, _, proc = mismatched_resume
    assert proc.returncode == 2
