"""DeepSpeed ZeRO (``train.distributed=deepspeed``) at world size 2 on CPU (gloo), when deepspeed is installed
(the ``deepspeed`` extra).

One torchrun launch trains every 2-rank run (`_matrix_worker.py`), one plain process the one-process references,
both at once. Checked: ZeRO-1 and ZeRO-2 at per-rank batch 2 train the weights of one process at batch 4 (fp32:
largest difference < 5e-5 and losses to 1e-4, as DDP in test_ddp_matrix; bf16: the relative oracle of
test_ddp_matrix), over classification and SFT (token-weighted loss), full fine-tuning and LoRA, with and
without accumulation, and equal DDP's weights to 5e-5; a run continued from its step-4 checkpoint (the ZeRO
optimizer partitions read back by ``engine.load_checkpoint``) ends with the uninterrupted run's weights to
1e-6; a NaN on one rank skips the step on both; a checkpoint is refused by a mode that cannot read it.

With the extra installed, accelerate imports deepspeed inside every ``save_pretrained`` (its
``extract_model_from_parallel``), so every process of the suite pays that import; that is why the extra is
not part of ``make setup`` and this module skips without it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from _dist import (
    COMMON,
    assert_matches_one_process,
    case_args,
    last_weights,
    launch_against_one_process,
    matrix_inputs,
    max_diff,
    one_process_name,
    ranks_of,
    train_losses,
)

if importlib.util.find_spec("deepspeed") is None:  # not imported here: that alone takes ~1 min on a busy CPU
    pytest.skip("the deepspeed extra is not installed (pip install -e '.[deepspeed]')", allow_module_level=True)

pytestmark = pytest.mark.e2e

LAUNCH_TIMEOUT = 1200  # seconds for all runs (importing deepspeed alone takes ~1 min per process on a busy CPU)
CASES = [  # task, method, precision, grad_accum, ZeRO stage
    ("classification", "full", "fp32", 1, 1),
    ("classification", "full", "fp32", 2, 2),
    ("sft", "lora", "fp32", 2, 2),
    ("sft", "full", "bf16", 1, 2),
]


def _zero(task: str, method: str, precision: str, accum: int, stage: int) -> str:
    return f"{task}-{method}-{accum}-{precision}-zero{stage}"


def _ds(stage: int) -> list[str]:
    return ["train.distributed=deepspeed", f"train.deepspeed.zero_optimization.stage={stage}"]


RESUMED = ("classification", "full", "fp32", 2, 2)  # continued from its step-4 checkpoint as "resumed"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("deepspeed")
    matrix_inputs(d)
    twos: list = [[*case_args(*c[:4]), f"output_dir={_zero(*c)}", "train.batch_size=2", *_ds(c[4])] for c in CASES]
    for accum in (1, 2):  # DDP twins of the two classification cases
        twos.append([*case_args("classification", "full", "fp32", accum), f"output_dir=ddp-{accum}",
                     "train.batch_size=2", "train.distributed=ddp"])
    src = _zero(*RESUMED)
    twos.append({"args": [*case_args(*RESUMED[:4]), "output_dir=resumed", "train.batch_size=2", *_ds(RESUMED[4])],
                 "copy": [f"{src}/checkpoints/step-00000004", "resumed/checkpoints/step-00000004"], "resume": True})
    twos.append({"args": ["model=bert", *COMMON, "output_dir=nan-zero", "train.max_steps=5", "train.batch_size=4",
                          "train.nonfinite=skip", *_ds(2)], "nan_at": [1, 3]})  # rank 1's 3rd micro-batch only
    launch_against_one_process(d, CASES, twos, LAUNCH_TIMEOUT)
    return d


@pytest.mark.parametrize(("task", "method", "precision", "accum", "stage"), CASES)
def test_zero_two_ranks_equal_one_process(runs: Path, task: str, method: str, precision: str, accum: int,
                                          stage: int) -> None:
    one_dir, two_dir = runs / one_process_name(task, method, precision, accum), runs / _zero(task, method, precision, accum, stage)
    assert sorted(train_losses(one_dir)) == sorted(train_losses(two_dir)) == list(range(1, 9))
    assert ranks_of(two_dir) == 2
    last = sorted((two_dir / "checkpoints").glob("step-*"))[-1]
    assert len(list((last / "deepspeed").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one partition per rank
    assert (two_dir / "model" / "model.safetensors").is_file() or (two_dir / "model" / "adapter_model.safetensors").is_file()
    assert_matches_one_process(one_dir, two_dir, runs / one_process_name(task, method, "fp32", accum), precision,
                               f"{task} {method} accum={accum} ZeRO-{stage}")


@pytest.mark.parametrize(("accum", "stage"), [(1, 1), (2, 2)])
def test_zero_equals_ddp(runs: Path, accum: int, stage: int) -> None:
    ddp = last_weights(runs / f"ddp-{accum}")
    zero = last_weights(runs / _zero("classification", "full", "fp32", accum, stage))
    diff = max_diff(ddp, zero)
    print(f"ZeRO-{stage} vs DDP, accum={accum}: max |w1 - w2| = {diff:.2e}")
    assert diff < 5e-5


def test_zero_resumes_from_its_checkpoint_to_the_same_weights(runs: Path) -> None:
    whole, resumed = runs / _zero(*RESUMED), runs / "resumed"
    assert max_diff(last_weights(whole), last_weights(resumed)) < 1e-6
    after = {s: v for s, v in train_losses(whole).items() if s > 4}
    assert train_losses(resumed) == pytest.approx(after, rel=1e-6)  # steps 5-8, logged by the resumed run


def test_a_zero_checkpoint_is_refused_in_one_process(runs: Path) -> None:
    """Its optimizer state is partitioned: resuming it without DeepSpeed fails with the key named."""
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.pipeline import train

    shutil.copytree(runs / _zero(*RESUMED) / "checkpoints" / "step-00000004",
                    runs / "switch" / "checkpoints" / "step-00000004")
    data = [f"model={runs / 'bert'}", f"data.train={runs / 'train.csv'}", f"data.validation={runs / 'val.csv'}"]
    args = [*data, *case_args(*RESUMED[:4])[len(data):], "train.batch_size=4", f"output_dir={runs / 'switch'}"]
    with pytest.raises(ConfigError, match=r"written by train\.distributed=deepspeed") as e:
        train(load_config(None, args), resume=True, quiet=True)
    assert e.value.key == "train.distributed"


def test_zero_refuses_a_checkpoint_it_cannot_read(runs: Path) -> None:
    """A DDP checkpoint (no ZeRO partitions), or ZeRO partitions of another world size, are refused before
    DeepSpeed is asked to load anything."""
    import torch

    from tuneforge.engine.deepspeed_zero import DeepSpeedStepper
    from tuneforge.engine.runtime import Runtime
    from tuneforge.errors import ConfigError

    stepper = object.__new__(DeepSpeedStepper)  # the checks need no engine
    stepper.runtime = Runtime(device=torch.device("cpu"), world_size=2)
    with pytest.raises(ConfigError, match=r"was not written by train\.distributed=deepspeed"):
        stepper.load_shards(runs / "ddp-1" / "checkpoints" / "step-00000008")
    stepper.runtime = Runtime(device=torch.device("cpu"), world_size=4)
    with pytest.raises(ConfigError, match="partitions of 2 ranks; resume it with 2 processes"):
        stepper.load_shards(runs / _zero(*RESUMED) / "checkpoints" / "step-00000008")


def test_nan_on_one_rank_skips_the_step_on_both(runs: Path) -> None:
    """Rank 1's loss is NaN at its 3rd micro-batch: both ranks skip step 3 (ZeRO drops the poisoned gradients,
    `DeepSpeedStepper.discard`) and finish; the weights stay finite."""
    state = json.loads((runs / "nan-zero" / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["nonfinite_total"] == 1 and state["step"] == 5
    assert sorted(train_losses(runs / "nan-zero")) == [1, 2, 4, 5]  # step 3 logged nothing: it was skipped
    for w in last_weights(runs / "nan-zero").values():
        assert bool(w.isfinite().all())
