"""SIGKILL and resume with a run extension active: the resumed run ends with the same weights (1e-6) as an
uninterrupted one, which needs the extension's own state (``toy_l2sp``'s starting weights) restored from the
checkpoint, not re-taken from the resumed weights.

The extension is the toy one of ``tests/unit/test_seams.py``, registered by importing that module in the
child process before the CLI runs (the way a user's plugin module would be).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _common import REPO, cli_env, sentiment_rows, write_csv

pytestmark = pytest.mark.e2e

MAX_STEPS = 40
BOOT = (f"import sys; sys.path.insert(0, {str(REPO / 'tests' / 'unit')!r}); import test_seams; "
        "from tuneforge.cli import main; sys.argv = ['tuneforge', *sys.argv[1:]]; main()")


def _args(run: Path) -> list[str]:
    return ["train", "model=tiny-bert", "data.train=train.csv", "data.validation=val.csv", f"output_dir={run}",
            f"train.max_steps={MAX_STEPS}", "train.save_steps=5", "train.eval_steps=20", "train.batch_size=8",
            "train.log_steps=1", "train.lr=1e-2", "train.precision=fp32",
            "extensions=[{name: toy_l2sp, weight: 0.5}]"]


def _child(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BOOT, *args], cwd=cwd, env=cli_env(), **kw)


def _checkpoints(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb)
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def test_sigkill_resume_with_extension_equals_uninterrupted(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", sentiment_rows(96))
    write_csv(tmp_path / "val.csv", sentiment_rows(30, offset=96))
    killed = tmp_path / "killed"
    with (tmp_path / "killed.log").open("w") as log:
        proc = _child(_args(killed), tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        try:
            while not [s for s in _checkpoints(killed) if s >= 15]:
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "model").exists()
    resumed_from = _checkpoints(killed)[-1]
    assert resumed_from < MAX_STEPS

    outputs = []
    for args in ([*_args(killed), "--resume"], _args(tmp_path / "reference")):
        done = _child(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = done.communicate(timeout=600)
        assert done.returncode == 0, out
        outputs.append(out)
    assert f"resumed from step {resumed_from} of {MAX_STEPS}" in outputs[0], outputs[0]
    last = f"step-{MAX_STEPS:08d}/trainable.safetensors"
    assert _max_diff(killed / "checkpoints" / last, tmp_path / "reference" / "checkpoints" / last) <= 1e-6
    assert _max_diff(killed / "model" / "model.safetensors", tmp_path / "reference" / "model" / "model.safetensors") <= 1e-6
    import json

    a = json.loads((killed / "metrics.json").read_text())["toy_l2sp"]["distance"]
    b = json.loads((tmp_path / "reference" / "metrics.json").read_text())["toy_l2sp"]["distance"]
    assert a == pytest.approx(b, abs=1e-6) and b > 1e-3  # measured from the same starting weights
