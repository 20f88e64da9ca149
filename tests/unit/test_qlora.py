"""QLoRA: the backbone's linear layers really are 4-bit NF4, LoRA trains on top, saving/loading is exact and
merge gives a plain fp32 model with the same outputs (the dequantised base plus the folded update)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_rows, write_csv
from tuneforge.config import load_config
from tuneforge.engine.runtime import Runtime
from tuneforge.methods import MethodContext, get_method
from tuneforge.methods.saved import load_trained
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names, trainable_summary
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import train

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'tuneforge[qlora]')")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_backbone_linear_layers_are_4bit(model: str) -> None:
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net, info = AutoModelForSequenceClassification.from_pretrained(resolve_model(model), num_labels=3,
                                                                   output_loading_info=True)
    linear = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n != "score"}
    n_weights = sum(m.weight.numel() for m in linear.values())
    fp32_bytes = _param_bytes(net)
    n_params = sum(p.numel() for p in net.parameters())
    run = load_config(None, [f"model={model}", "method=qlora"])
    wrapped = get_method("qlora").runtime().apply(net, run, MethodContext(head_parameter_names(net, info["missing_keys"]), 2))

    q = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
         for n, m in wrapped.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(q) == set(linear)  # every backbone linear layer, not the head
    assert isinstance(wrapped.base_model.model.score.modules_to_save["default"], nn.Linear)
    for name, layer in q.items():
        w = layer.weight
        assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4" and w.quant_state.nested
        assert w.numel() * w.element_size() == linear[name].weight.numel() // 2  # two 4-bit codes per byte
        # the per-block scales (64 weights per block) are themselves 8-bit with double quantisation
        assert w.quant_state.absmax.dtype == torch.uint8
        assert w.quant_state.absmax.numel() == linear[name].weight.numel() // 64
    # the model shrinks by exactly 4 - 1/2 bytes per quantised weight (LoRA adds its own fp32 matrices)
    lora_bytes = sum(p.numel() * 4 for n, p in wrapped.named_parameters() if ".lora_" in n)
    head_copy = sum(p.numel() * 4 for n, p in wrapped.named_parameters() if ".modules_to_save." in n)
    assert _param_bytes(wrapped) == fp32_bytes - n_weights * 3.5 + lora_bytes + head_copy
    # parameter counts are of weights, not of the bytes that pack them (two 4-bit codes per uint8 element)
    lora_params, head_params = lora_bytes // 4, head_copy // 4
    assert trainable_summary(wrapped) == (lora_params + head_params,
                                          n_params + lora_params + head_params)


def test_qlora_trains_reloads_and_merges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    rows = make_rows(24)
    train_csv, val_csv = write_csv(tmp_path / "train.csv", rows[:8]), write_csv(tmp_path / "val.csv", rows[8:])
    module = importlib.import_module(get_method("qlora").module)
    captured: dict[str, nn.Module] = {}
    real_apply = module.apply
    monkeypatch.setattr(module, "METHOD", dataclasses.replace(module.METHOD, apply=lambda m, run, ctx: captured.setdefault("model", real_apply(m, run, ctx))))
    out = tmp_path / "run"
    train(load_config(None, [
        "model=tiny-gpt2", "method=qlora", "method.target_modules=all-linear", f"data.train={train_csv}",
        f"data.validation={val_csv}", "train.batch_size=8", "train.max_steps=5", "train.log_steps=1",
        "train.warmup_steps=0", "train.schedule=constant", "train.lr=5e-3", "train.precision=fp32",
        "train.tensorboard=false", "train.seed=0", f"output_dir={out}"]), quiet=True)
    trained = captured["model"]
    codes = {n: m.weight.data.clone() for n, m in trained.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train" and "loss" in r]
    assert losses[-1] < losses[0], losses
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == {
        n for n, _ in trained.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    assert (out / "model" / "adapter_model.safetensors").stat().st_size < 64 * 1024  # adapter only, no base

    run_cfg = load_config(out / "config.yaml")
    obj = ClassificationObjective(run_cfg)
    built = obj.from_saved(out / "model")
    batches = obj.prepare(obj.read_split(val_csv), built.tokenizer, run_cfg)

    def logits(m: nn.Module) -> torch.Tensor:
        return obj.logits(m, batches, batch_size=32, runtime=Runtime.cpu())[0]

    reference = logits(trained)
    assert torch.equal(logits(built.model), reference)  # the reloaded base quantises to the same codes
    loaded_codes = {n: m.weight.data for n, m in built.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert loaded_codes.keys() == codes.keys() and all(torch.equal(loaded_codes[n], codes[n]) for n in codes)

    merged = get_method("qlora").runtime().merge(
        load_trained(AutoModelForSequenceClassification, out / "model", dtype=torch.float32))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)  # GPT-2's own layer type again
    assert merged.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    torch.testing.assert_close(logits(merged), reference, atol=1e-4, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(plain), logits(merged))
