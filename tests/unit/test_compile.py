"""``train.compile`` (`engine.compile`): which blocks compile, the same numbers as eager, a run that trains
and saves the same parameter names, and the refused combinations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from tuneforge.config import load_config
from tuneforge.engine.compile import apply_compile, repeated_blocks
from tuneforge.errors import ConfigError
from tuneforge.models import resolve_model
from tuneforge.pipeline import train


def test_repeated_blocks_are_the_transformer_layers() -> None:
    llama = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"))
    assert repeated_blocks(llama) == list(llama.model.layers)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(resolve_model("tiny-t5"))
    assert repeated_blocks(t5) == [*t5.encoder.block, *t5.decoder.block]  # not the sub-layers inside a block
    with pytest.raises(ConfigError, match=r"train\.compile=model") as info:
        apply_compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), "blocks")
    assert info.value.key == "train.compile"


def test_compiled_blocks_give_the_eager_loss_and_gradients() -> None:
    eager = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32).eval()
    compiled = copy.deepcopy(eager)
    assert apply_compile(compiled, "blocks") == len(eager.model.layers)
    ids = torch.randint(3, 900, (2, 10))
    for model in (eager, compiled):
        model(input_ids=ids, labels=ids).loss.backward()
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_compiled_run_trains_and_saves_plain_weights(tmp_path: Path, tiny_csv, monkeypatch) -> None:
    """The pipeline path: compiled blocks train and the run saves the model's own parameter names. Compiled
    with the ``aot_eager`` backend (dynamo's graph capture and AOT autograd without inductor's code generation,
    which took ~40 s here and whose numbers the test above checks)."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compile_module(self, *a, **{**k, "backend": "aot_eager"}))
    # rows of one token length, so one shape compiles (each new shape recompiles: ~10 s each here)
    data = tiny_csv(rows=[("good movie", "positive"), ("bad movie", "negative")] * 12)
    run = load_config(None, ["model=tiny-bert", f"data.train={data}", "train.max_steps=3", "train.batch_size=8",
                             "train.lr=1e-3", "train.compile=blocks", "train.tensorboard=false",
                             f"output_dir={tmp_path / 'run'}"])
    result = train(run, overwrite=True, quiet=True)
    assert result.metrics["train"]["steps"] == 3
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert names and not any("_orig_mod" in n for n in names)


def test_compile_is_refused_with_sharded_training() -> None:
    with pytest.raises(Exception, match=r"train\.compile=blocks runs single-process or under DDP"):
        load_config(None, ["train.compile=blocks", "train.distributed=fsdp"])
    with pytest.raises(Exception, match=r"allowed|literal|'off'"):
        load_config(None, ["train.compile=fast"])
    # YAML reads off/on as booleans
    assert load_config(None, ["train.compile=off"]).train.compile == "off"
    assert load_config(None, ["train.compile=true"]).train.compile == "blocks"
