"""Bottleneck adapters: identity at init on every supported architecture, parameter counts by formula,
hook placement by module name (Houlsby vs Pfeiffer), the adapter arithmetic, training keeps the base frozen,
save/load, and clear errors for bad options and unknown architectures."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.methods.adapter.apply import WEIGHTS_FILE, wrap
from tuneforge.methods.adapter.config import AdapterConfig
from tuneforge.methods.adapter.layer import (
    BottleneckAdapter,
    _AdapterHook,
    adapter_set,
    attach,
    detach,
    find_sites,
)
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import param_depth

HIDDEN = 32  # every tiny model
# model -> (prefix of the block list in the full model, block list path in the base model, n blocks, attn, ffn)
ARCHS = {
    "tiny-bert": ("bert.", ["encoder.layer"], "attention.output.dense", "output.dense"),
    "tiny-roberta": ("roberta.", ["encoder.layer"], "attention.output.dense", "output.dense"),
    "tiny-llama": ("model.", ["layers"], "self_attn.o_proj", "mlp.down_proj"),
    "tiny-gpt2": ("transformer.", ["h"], "attn.c_proj", "mlp.c_proj"),
    "tiny-t5": ("transformer.", ["encoder.block", "decoder.block"], "layer.0.SelfAttention.o", None),
}


def _classifier(name: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(name), num_labels=3).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (3, 11), generator=g)
    ids[:, -1] = model.config.eos_token_id or 2  # T5 classification pools at the (single) eos token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ffn(name: str, list_path: str) -> str:
    if name != "tiny-t5":
        return ARCHS[name][3]
    return "layer.2.DenseReluDense.wo" if list_path.startswith("decoder") else "layer.1.DenseReluDense.wo"


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_fresh_adapters_equal_base_and_counts_and_placement(name: str, style: str) -> None:
    model = _classifier(name)
    batch = _inputs(model)
    with torch.no_grad():
        base = model(**batch).logits
    total_before = sum(p.numel() for p in model.parameters())
    wrap(model, AdapterConfig(style=style, bottleneck=5))
    with torch.no_grad():
        adapted = model(**batch).logits
    assert torch.equal(adapted, base)  # the zero up-projection makes the wrapped model the base, exactly

    # parameter count: per adapter 2*h*b + h + b; x2 per block (Houlsby) or x1 (Pfeiffer); x blocks
    prefix, lists, attn, _ = ARCHS[name]
    n_blocks = 2 * len(lists)
    per_block = 2 if style == "houlsby" else 1
    expected = (2 * HIDDEN * 5 + HIDDEN + 5) * per_block * n_blocks
    aset = adapter_set(model)
    assert sum(p.numel() for p in aset.parameters()) == expected
    assert sum(p.numel() for p in model.parameters()) == total_before + expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".bottleneck_adapters." in n}

    # placement by module name: Houlsby after attention output and FFN output, Pfeiffer after FFN only
    want = {}
    for lp in lists:
        for i in range(2):
            if style == "houlsby":
                want[f"{lp}.{i}.attn"] = f"{lp}.{i}.{attn}"
            want[f"{lp}.{i}.ffn"] = f"{lp}.{i}.{_ffn(name, lp)}"
    assert aset.sites == want
    modules = dict(model.named_modules())
    adapters = dict(aset.adapters())
    hooked = {n.removeprefix(prefix) for n, m in modules.items()
              if any(isinstance(h, _AdapterHook) for h in m._forward_hooks.values())}
    assert hooked == set(want.values())
    for adapter_name, module_name in want.items():
        (hook,) = modules[prefix + module_name]._forward_hooks.values()
        assert hook.adapter is adapters[adapter_name]
        assert f"{prefix}bottleneck_adapters.{adapter_name}.up.weight" in dict(model.named_parameters())


def test_adapter_arithmetic_and_hook_output() -> None:
    torch.manual_seed(0)
    for act, fn in (("relu", torch.relu), ("gelu", torch.nn.functional.gelu), ("silu", torch.nn.functional.silu),
                    ("tanh", torch.tanh)):
        a = BottleneckAdapter(6, 3, act)
        nn.init.normal_(a.up.weight)
        nn.init.normal_(a.up.bias)
        nn.init.normal_(a.down.bias)
        h = torch.randn(2, 4, 6)
        manual = h + (fn(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
        torch.testing.assert_close(a(h), manual)
    # the hook replaces the projection's output by adapter(output)
    proj = nn.Linear(6, 6)
    hook = _AdapterHook(a)
    proj.register_forward_hook(hook)
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), a(x @ proj.weight.T + proj.bias))


def test_reduction_factor_and_bf16_identity_and_detach() -> None:
    model = _classifier("tiny-bert")
    batch = _inputs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(**batch).logits
    wrap(model, AdapterConfig(reduction_factor=8))  # 32 // 8 = 4
    (_, first), *_ = adapter_set(model).adapters()
    assert first.down.out_features == 4 and first.up.in_features == 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(**batch).logits, base)  # identity under bf16 autocast too
    for _, a in adapter_set(model).adapters():
        nn.init.normal_(a.up.weight)
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits.float(), base.float())
        detach(model)
        assert adapter_set(model) is None
        assert not any(m._forward_hooks for m in model.modules())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(**batch).logits, base)
    assert AdapterConfig().bottleneck_for(384) == 24  # default reduction factor 16


def test_adapter_depths_follow_their_blocks() -> None:
    model = _classifier("tiny-llama")
    wrap(model, AdapterConfig())
    for name, _ in model.named_parameters():
        if ".bottleneck_adapters.layers.1." in name:
            assert param_depth(name, 2) == 2  # block 1 -> depth 2: layer-wise LR decay sees it in place


def test_training_moves_adapters_and_head_only(tmp_path: Path, tiny_csv: Callable[..., Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneforge.methods.adapter import apply as adapter_apply
    from tuneforge.methods.saved import load_trained
    from tuneforge.pipeline import train

    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)
    seen: dict[str, object] = {}
    real = adapter_apply.apply

    def spy(model, run, ctx):
        model = real(model, run, ctx)
        seen["model"], seen["head"] = model, set(ctx.head_names)
        seen["initial"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return model

    monkeypatch.setattr(adapter_apply, "METHOD", dataclasses.replace(adapter_apply.METHOD, apply=spy))
    cfg = load_config(None, [f"data.train={tiny_csv(40)}", "model=tiny-bert", "method=adapter", "method.style=pfeiffer",
                             "method.bottleneck=4", "train.max_steps=4", "train.batch_size=8", "train.precision=fp32",
                             "train.tensorboard=false", f"output_dir={tmp_path / 'run'}"])
    res = train(cfg, quiet=True)
    model, initial = seen["model"], seen["initial"]
    final = dict(model.named_parameters())
    for n, v in initial.items():
        moved = not torch.equal(final[n], v)
        if (".bottleneck_adapters." in n and ".up." in n) or n.startswith("classifier."):
            assert moved, n
        elif ".bottleneck_adapters." not in n and n not in seen["head"]:
            assert not moved, n  # the base stays bit-identical
    assert any(float(final[n].detach().abs().max()) > 0 for n in final if n.endswith("ffn.up.weight"))

    # saved: adapter + head tensors only, and they load back onto a fresh base
    folder = res.run_dir / "model"
    from safetensors.torch import load_file

    saved = load_file(str(folder / WEIGHTS_FILE))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for n, t in saved.items() if "bottleneck" in n) == (2 * 32 * 4 + 32 + 4) * 2
    manifest = json.loads((folder / "tuneforge_method.json").read_text())
    assert manifest["options"]["style"] == "pfeiffer" and manifest["options"]["bottleneck"] == 4
    from transformers import AutoModelForSequenceClassification

    loaded = load_trained(AutoModelForSequenceClassification, folder).eval()
    model.eval()
    batch = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)

    # a manifest that no longer matches the weights is refused, not silently half-loaded
    manifest["options"]["style"] = "houlsby"
    (folder / "tuneforge_method.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match"):
        load_trained(AutoModelForSequenceClassification, folder)


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="not both") as info:
        load_config(None, ["method=adapter", "method.bottleneck=8", "method.reduction_factor=4"])
    assert "method.bottleneck" in str(info.value)
    with pytest.raises(ConfigError, match=r"'relu', 'gelu', 'silu' or 'tanh'") as info:
        load_config(None, ["method=adapter", "method.non_linearity=swish"])
    assert info.value.key == "method.non_linearity"
    with pytest.raises(ConfigError, match=r"'houlsby' or 'pfeiffer'") as info:
        load_config(None, ["method=adapter", "method.style=lora"])
    assert info.value.key == "method.style"
    with pytest.raises(ConfigError) as info:
        AdapterConfig(reduction_factor=64).bottleneck_for(32)
    assert info.value.key == "method.reduction_factor" and "allowed: reduction_factor <= 32" in str(info.value)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Linear(4, 4)


class _Unknown(nn.Module):
    """A model whose blocks have none of the known projection names."""

    def __init__(self, blocks: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block()]) if blocks else nn.ModuleList()
        self.out = nn.Linear(4, 4)

    @property
    def base_model(self) -> nn.Module:
        return self


def test_unknown_architecture_names_what_was_searched() -> None:
    with pytest.raises(ConfigError) as info:
        attach(_Unknown(), style="pfeiffer", bottleneck_for=lambda h: 2, non_linearity="relu", dropout=0.0)
    msg = str(info.value)
    assert info.value.key == "method"
    assert "_Block" in msg and "layers.0" in msg
    for searched in ("attention.output.dense", "mlp.down_proj", "attn.c_proj", "DenseReluDense.wo"):
        assert searched in msg
    with pytest.raises(ConfigError, match="no ModuleList named layer/layers/h/block/blocks"):
        find_sites(_Unknown(blocks=False), "houlsby")


def test_adapter_module_refuses_unknown_activation() -> None:
    with pytest.raises(ConfigError, match="allowed: relu, gelu, silu, tanh") as info:
        BottleneckAdapter(4, 2, "swish")
    assert info.value.key == "method.non_linearity"
