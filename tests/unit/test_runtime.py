"""`Runtime`: device and precision resolution, batch placement, RNG state, and the CUDA paths.

The CUDA tests are marked ``gpu`` and skipped with the reason where no CUDA device is present; on a GPU
machine they train a classifier and an SFT model on ``train.device=cuda`` (bf16 where the GPU has it) and
resume on the CPU from a checkpoint written on the GPU.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.engine.runtime import (
    BF16_MIN_SPEEDUP,
    Runtime,
    available_devices,
    cpu_bf16_speedup,
    cpu_has_bf16,
    resolve_device,
    resolve_precision,
)
from tuneforge.errors import ConfigError

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none present)")


def test_auto_device_is_the_best_present_and_cpu_always_is() -> None:
    present = available_devices()
    assert present[-1] == "cpu"
    assert resolve_device("auto") == torch.device(present[0])
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_absent_device_is_a_config_error_naming_the_key_and_what_is_present() -> None:
    with pytest.raises(ConfigError) as err:
        Runtime.create("cuda:1")
    assert err.value.key == "train.device"
    assert "not available" in str(err.value) and "present: " + ", ".join(available_devices()) in str(err.value)


def test_device_spelling_is_validated_at_config_time() -> None:
    with pytest.raises(ConfigError, match="allowed: auto, cpu, cuda, cuda:N, mps") as err:
        load_config(None, ["train.device=gpu"])
    assert err.value.key == "train.device"
    assert load_config(None, ["train.device=cuda:3"]).train.device == "cuda:3"  # form ok; presence checked at run


def test_precision_per_device() -> None:
    fast = cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    assert resolve_precision("auto", "cpu") == ("bf16" if fast else "fp32")
    assert not fast or cpu_has_bf16()  # never bf16 where it is emulated
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(ConfigError, match="fp16 autocast needs a GPU") as err:
        resolve_precision("fp16", "cpu")
    assert err.value.key == "train.precision"
    if HAS_CUDA:
        assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_auto_takes_bf16_on_a_cpu_only_where_it_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX machine: bf16 6.5x fp32 -> bf16; AVX512-BF16 without AMX: 0.5x -> fp32; close calls stay fp32;
    an explicit precision is taken as asked without measuring."""
    import tuneforge.engine.runtime as rt_mod

    for speedup, want in ((6.5, "bf16"), (0.5, "fp32"), (1.1, "fp32"), (BF16_MIN_SPEEDUP, "bf16"), (0.0, "fp32")):
        monkeypatch.setattr(rt_mod, "cpu_bf16_speedup", lambda s=speedup: s)
        assert resolve_precision("auto", "cpu") == want, speedup
        assert Runtime.create("cpu", "auto", tune_allocator=False).precision == want

    def boom() -> float:
        raise AssertionError("measured although the precision was given")

    monkeypatch.setattr(rt_mod, "cpu_bf16_speedup", boom)
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"


def test_bf16_speedup_is_measured_on_this_cpu() -> None:
    cpu_bf16_speedup.cache_clear()
    state = torch.random.get_rng_state()
    s = cpu_bf16_speedup()
    assert torch.equal(torch.random.get_rng_state(), state)  # a run's seeded random stream is not consumed
    assert s == cpu_bf16_speedup()  # once per process
    assert (s > 0) == cpu_has_bf16() and s < 100


def test_autocast_inference_scaler_and_placement_on_cpu() -> None:
    rt = Runtime.cpu("bf16")
    lin = torch.nn.Linear(4, 4)
    with rt.inference():
        out = lin(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and not out.requires_grad
    assert rt.grad_scaler() is None and Runtime.cpu().autocast_dtype is None
    batch = {"x": torch.ones(2), "n": 3}
    assert rt.to_device(batch)["x"] is batch["x"]  # CPU: no copies
    assert rt.is_main and rt.world_size == 1 and rt.wrap(lin) is lin


def test_inference_casts_each_weight_once_for_all_batches() -> None:
    """Under ``Runtime.inference`` autocast keeps its bf16 copy of each trainable weight for the whole pass
    (it does not under ``inference_mode``, which recast every weight for every batch): over 3 batches through
    3 layers, 6 weight/bias casts + 3 input casts instead of 3 x (6 + 1)."""
    from torch.profiler import profile

    rt = Runtime.cpu("bf16")
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
    with profile() as prof, rt.inference():
        for _ in range(3):
            model(torch.randn(2, 8))
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    assert casts == 6 + 3, casts


def test_rng_state_round_trip() -> None:
    rt = Runtime.cpu()
    state = rt.rng_state()
    a = (torch.rand(3), random.random())
    Runtime.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# --------------------------------------------------------------------------- CUDA (skipped without one)
def _cuda_run(tmp_path: Path, *extra: str) -> dict:
    from tuneforge.pipeline import train

    res = train(load_config(None, [f"output_dir={tmp_path}", "train.device=cuda", "train.tensorboard=false",
                                   *extra]), quiet=True)
    return res.metrics


@gpu
def test_classification_trains_on_cuda(tmp_path: Path, tiny_csv) -> None:
    m = _cuda_run(tmp_path / "run", f"data.train={tiny_csv(96)}", "model=tiny-bert", "train.epochs=3",
                  "train.lr=1e-3")
    assert m["train"]["device"].startswith("cuda")
    assert m["train"]["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert m["splits"]["validation"]["accuracy"] >= m["splits"]["validation"]["majority_accuracy"]


@gpu
def test_sft_trains_on_cuda(tmp_path: Path) -> None:
    import json

    data = tmp_path / "chat.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": f"{w} {w} {w}"} for w in ("red", "green", "blue", "cat") * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = _cuda_run(tmp_path / "run", "task=sft", "model=tiny-llama", "method=lora", f"data.train={data}",
                  "train.max_steps=20", "train.lr=5e-3", "train.eval_on_start=true")
    assert m["train"]["device"].startswith("cuda")
    first, last = m["train"]["best_metric"], m["splits"]["validation"]["loss"]
    assert last <= first


@gpu
def test_checkpoint_from_cuda_resumes_on_cpu(tmp_path: Path, tiny_csv) -> None:
    """Train 6 of 12 steps on the GPU, then resume on the CPU (another process, CUDA hidden) to the end."""
    data = tiny_csv(96)
    common = [f"data.train={data}", "model=tiny-bert", "train.max_steps=12", "train.save_steps=6",
              "train.precision=fp32", f"output_dir={tmp_path / 'run'}", "train.tensorboard=false"]
    from tuneforge.engine.checkpoint import latest_checkpoint
    from tuneforge.pipeline import train

    with pytest.raises(KeyboardInterrupt):  # stop the GPU run right after its step-6 checkpoint
        from tuneforge.engine import checkpoint as ck

        real = ck.save_checkpoint

        def stop_after(*a, **k):
            path = real(*a, **k)
            if path.name == "step-00000006":
                raise KeyboardInterrupt
            return path

        import tuneforge.engine.loops as loops

        loops.save_checkpoint, saved = stop_after, loops.save_checkpoint
        try:
            train(load_config(None, [*common, "train.device=cuda"]), quiet=True)
        finally:
            loops.save_checkpoint = saved
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000006"
    code = ("import sys; from tuneforge.config import load_config; from tuneforge.pipeline import train; "
            f"r = train(load_config(None, {[*common, 'train.device=cpu']!r}), resume=True, quiet=True); "
            "print(r.metrics['train']['steps'], r.metrics['train']['device'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["12", "cpu"]


def test_cuda_runtime_switches_off_cudnn_attention():
    """A CUDA runtime turns SDPA's cuDNN backend off (a per-shape graph build; see `engine.runtime`); a CPU
    runtime leaves the flag alone. Checked through `_tune_host`, which needs no GPU to set the flag."""
    from tuneforge.engine.runtime import _tune_host

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        _tune_host(torch.device("cpu"), wanted=False)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        _tune_host(torch.device("cuda", 0), wanted=False)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
