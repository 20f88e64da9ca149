"""In-process checks of the distributed pieces that need no second process: how a global batch is shared, the
loss weights (against the arithmetic of a global mean), the launcher environment and the refusals."""

from __future__ import annotations

import pytest
import torch

from tuneforge.engine.distributed import env_placement, loss_weight, shard, unwrap
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError


@pytest.mark.parametrize(("n", "world"), [(8, 2), (7, 2), (1, 2), (10, 4), (3, 4), (5, 1)])
def test_shards_are_contiguous_balanced_and_cover_the_batch(n: int, world: int) -> None:
    batch = list(range(100, 100 + n))
    parts = [shard(batch, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == batch  # in order, each example once
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_weighted_rank_means_average_to_the_global_mean() -> None:
    """DDP averages the ranks' gradients; with `loss_weight` that average is the mean over all units."""
    torch.manual_seed(0)
    per_unit = torch.rand(11)  # e.g. token losses of one global batch, split 7 / 4 / 0 over 3 ranks
    splits = [per_unit[:7], per_unit[7:], per_unit[:0]]
    total = sum(len(s) for s in splits)
    ranks = [float(s.mean()) * loss_weight(len(s), total, 3) if len(s) else 0.0 for s in splits]
    assert sum(ranks) / 3 == pytest.approx(float(per_unit.mean()), rel=1e-6)
    assert loss_weight(0, 0, 2) == 0.0  # no unit anywhere (e.g. no supervised token): no gradient


def test_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert env_placement().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    p = env_placement()
    assert (p.rank, p.local_rank, p.world_size) == (3, 1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="inconsistent"):
        env_placement()


def test_none_under_a_launcher_is_refused_with_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"train\.distributed=none but the launcher started 2 processes") as e:
        Runtime.create("cpu", "fp32", "none")
    assert e.value.key == "train.distributed"


def test_missing_rendezvous_address_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT is not set"):
        Runtime.create("cpu", "fp32", "auto")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_process_is_unchanged(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = Runtime.create("cpu", "fp32", mode)
    model = torch.nn.Linear(2, 2)
    assert (rt.world_size, rt.distributed) == (1, "none")
    assert rt.wrap(model) is model and unwrap(model) is model
    assert rt.all_reduce_sum([1, 2.5]) == [1.0, 2.5] and rt.broadcast({"a": 1}) == {"a": 1}
    assert rt.describe() == "cpu (fp32)"


def test_deepspeed_config_fills_what_train_owns(tmp_path) -> None:
    """train.deepspeed passes through; batch sizes, accumulation and clipping come from train.* ("auto" allowed)."""
    import json

    from tuneforge.config.schema import TrainConfig
    from tuneforge.engine.deepspeed_zero import ds_config

    default = ds_config(TrainConfig(batch_size=4, grad_accum=2, max_grad_norm=0.5), 2)
    assert default["zero_optimization"] == {"stage": 2}
    assert (default["train_micro_batch_size_per_gpu"], default["gradient_accumulation_steps"],
            default["train_batch_size"], default["gradient_clipping"]) == (4, 2, 16, 0.5)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000},
                                "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.0}))
    out = ds_config(TrainConfig(batch_size=4, max_grad_norm=None, deepspeed=str(path)), 3)
    assert out["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}  # passed through as written
    assert (out["train_micro_batch_size_per_gpu"], out["train_batch_size"], out["gradient_clipping"]) == (4, 12, 0.0)


@pytest.mark.parametrize(("given", "key", "match"), [
    ({"train_micro_batch_size_per_gpu": 8}, "train.deepspeed.train_micro_batch_size_per_gpu",
     r"contradicts train\.batch_size \(4\)"),
    ({"gradient_accumulation_steps": 4}, "train.deepspeed.gradient_accumulation_steps", r"contradicts train\.grad_accum"),
    ({"zero_optimization": {"stage": 3}}, "train.deepspeed.zero_optimization.stage", "use train.distributed=fsdp"),
    ({"zero_optimization": {"stage": 0}}, "train.deepspeed.zero_optimization.stage", "use train.distributed=ddp"),
    ({"zero_optimization": {"overlap_comm": False}}, "train.deepspeed.zero_optimization.stage",
     "stages 1 and 2"),  # no stage given: DeepSpeed would run its default, stage 0
    ({"optimizer": {"type": "Adam"}}, "train.deepspeed.optimizer", r"train\.\* \(AdamW"),
    ({"bf16": {"enabled": True}}, "train.deepspeed.bf16", r"precision is train\.precision"),
])
def test_deepspeed_config_refusals_name_the_key(given: dict, key: str, match: str) -> None:
    from tuneforge.config.schema import TrainConfig
    from tuneforge.engine.deepspeed_zero import ds_config

    cfg = {"zero_optimization": {"stage": 2}, **given}
    with pytest.raises(ConfigError, match=match) as e:
        ds_config(TrainConfig(batch_size=4, deepspeed=cfg), 2)
    assert e.value.key == key


def test_deepspeed_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tuneforge.engine.deepspeed_zero import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without the extra gives
    with pytest.raises(ConfigError, match=r"pip install 'tuneforge\[deepspeed\]'") as e:
        import_deepspeed()
    assert e.value.key == "train.distributed"
