"""Resume keeps the precision a checkpoint was trained in (`LoopBase._keep_precision`).

``precision: auto`` resolves per machine (on a CPU it measures bf16 against fp32, `engine.runtime`), so a run
cut on one machine and resumed on another could switch precision and stop being exact. Under ``auto`` the
checkpoint's precision is kept; an explicit ``train.precision`` wins with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

import tuneforge.engine.runtime as rt
from conftest import interrupt_after_checkpoint
from tuneforge.config import load_config
from tuneforge.engine.loops import LoopBase
from tuneforge.engine.runtime import Runtime
from tuneforge.pipeline import train


def _cfg(tmp_path: Path, data: Path, name: str):
    return load_config(None, ["model=tiny-bert", f"data.train={data}", "train.batch_size=8", "train.max_steps=6",
                              "train.save_steps=3", "train.eval_steps=3", "train.lr=5e-3", "train.warmup_steps=0",
                              "train.tensorboard=false", f"output_dir={tmp_path / name}"])


def test_auto_resumes_in_the_checkpoints_precision(tmp_path: Path, tiny_csv: Callable[..., Path],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Cut at step 3 where auto measured bf16 slower (fp32), resumed where it measures bf16 6.5x faster: the
    run continues in fp32 and ends with the uninterrupted fp32 run's weights, bit for bit."""
    data = tiny_csv(n=48)
    monkeypatch.setattr(rt, "cpu_bf16_speedup", lambda: 0.5)
    whole = train(_cfg(tmp_path, data, "whole"), overwrite=True, quiet=True)
    assert whole.metrics["train"]["precision"] == "fp32"
    interrupt_after_checkpoint(lambda: train(_cfg(tmp_path, data, "cut"), overwrite=True, quiet=True), step=3)
    monkeypatch.setattr(rt, "cpu_bf16_speedup", lambda: 6.5)
    assert rt.resolve_precision("auto", "cpu") == "bf16"  # what a fresh run would now pick
    resumed = train(load_config(tmp_path / "cut" / "config.yaml"), resume=True)
    assert "resuming step-00000003 in fp32, the precision it was trained in" in capsys.readouterr().out
    assert resumed.metrics["train"]["precision"] == "fp32"
    wa = load_file(str(whole.run_dir / "model" / "model.safetensors"))
    wb = load_file(str(resumed.run_dir / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.parametrize(("requested", "saved", "now", "kept", "says"), [
    ("auto", "bf16", "fp32", "bf16", "resuming step-00000007 in bf16"),
    ("fp32", "bf16", "fp32", "fp32", "warning: step-00000007 was trained in bf16; continuing in fp32"),
    ("auto", "fp16", "bf16", "bf16", "warning: step-00000007 was trained in fp16"),  # fp16 needs its grad scaler
    ("auto", "", "fp32", "fp32", ""),  # a checkpoint from before precision was kept: nothing to compare
    ("auto", "fp32", "fp32", "fp32", ""),
])
def test_keep_precision_rules(requested: str, saved: str, now: str, kept: str, says: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    loop = SimpleNamespace(state=SimpleNamespace(precision=saved), runtime=Runtime.cpu(now),
                           cfg=SimpleNamespace(precision=requested), quiet=False)
    LoopBase._keep_precision(loop, Path("/runs/x/checkpoints/step-00000007"))
    assert loop.runtime.precision == kept and loop.state.precision == kept
    out = capsys.readouterr().out
    assert (says in out) if says else out == ""
