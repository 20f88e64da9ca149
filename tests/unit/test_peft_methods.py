"""The peft-backed methods (lora/rsLoRA/DoRA, ia3, prefix, ptuning_v2, prompt) against peft itself and formulas.

The shared matrix (`test_method_matrix.py`) trains every method on three tiny models; this file checks what
is specific to these methods: LoRA equals plain ``get_peft_model`` (same seed, same weights and outputs) and
the LoRA/rsLoRA/DoRA/IA3 formulas; targets resolve per architecture and unknown names fail with the model's
linear names; trained mergeable runs keep the base bit-identical to the checkpoint file, reload exactly, load
with plain ``PeftModel.from_pretrained`` and merge into plain transformers folders; prompt-learning options
have the documented shapes and inits, decoder prompt tuning pools the last real token, and T5 is refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import make_rows, write_csv
from tuneforge.config import load_config
from tuneforge.data.batching import TokenBatches
from tuneforge.engine.runtime import Runtime
from tuneforge.errors import ConfigError
from tuneforge.methods import MethodContext, get_method
from tuneforge.methods.saved import load_trained
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names
from tuneforge.objectives.classification import ClassificationObjective
from tuneforge.pipeline import train

MODELS = ("tiny-bert", "tiny-llama", "tiny-gpt2")
BACKBONE = {"tiny-bert": "bert.", "tiny-llama": "model.", "tiny-gpt2": "transformer."}
PEFT_MARKERS = ("lora_", "ia3_", "base_layer", "modules_to_save", "original_module", "prompt_encoder")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One fixed training batch of 8 rows (so 5 steps must lower its loss) and 16 validation rows."""
    rows = make_rows(24)
    root = tmp_path_factory.mktemp("peft-data")
    return write_csv(root / "train.csv", rows[:8]), write_csv(root / "val.csv", rows[8:])


def _fresh(model: str, method_overrides: list[str]) -> tuple[nn.Module, object, MethodContext]:
    """A seeded classifier on a tiny model, the run config and the pipeline's method context."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(model)
    torch.manual_seed(0)
    m, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, output_loading_info=True)
    if m.config.pad_token_id is None:
        m.config.pad_token_id = AutoTokenizer.from_pretrained(path).eos_token_id
    run = load_config(None, [f"model={model}", *method_overrides])
    return m, run, MethodContext(head_parameter_names(m, info["missing_keys"]), 2)


def _apply(model: str, *method_overrides: str, seed: int = 1) -> nn.Module:
    m, run, ctx = _fresh(model, list(method_overrides))
    torch.manual_seed(seed)
    return get_method(run.method.name).runtime().apply(m, run, ctx)


def _peft_layers(model: nn.Module, attr: str) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, attr) and hasattr(m, "base_layer")}


# --------------------------------------------------------------------------- LoRA vs peft and the formulas
def test_lora_equals_plain_peft_and_the_formula() -> None:
    import peft

    ours = _apply("tiny-bert", "method=lora")
    ref_model, _, _ = _fresh("tiny-bert", [])
    torch.manual_seed(1)
    ref = peft.get_peft_model(ref_model, peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"],
        modules_to_save=["bert.pooler.dense", "classifier"]))
    a, b = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k for k, p in a.items() if p.requires_grad} == {k for k, p in b.items() if p.requires_grad}
    assert sorted(n.rsplit(".", 1)[-1] for n in _peft_layers(ours, "lora_A")) == ["query", "query", "value", "value"]

    gen = torch.Generator().manual_seed(2)  # B starts at zero: give both the same non-zero B
    with torch.no_grad():
        for k in sorted(a):
            if ".lora_B." in k:
                noise = torch.randn(a[k].shape, generator=gen)
                a[k].copy_(noise)
                b[k].copy_(noise)
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, ref(**batch).logits)

    # y = W x + b + (alpha / r) · B A x on one adapted layer
    layer = ours.base_model.model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(2, 5, 32, generator=gen)
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, W, bias) + 16 / 8 * (x @ A.T @ B.T))


def test_rslora_scaling_and_dora_magnitude() -> None:
    plain = _peft_layers(_apply("tiny-bert", "method=lora", "method.r=4", "method.alpha=16"), "lora_A")
    rs = _peft_layers(_apply("tiny-bert", "method=lora", "method.r=4", "method.alpha=16", "method.use_rslora=true"),
                      "lora_A")
    assert len(plain) == len(rs) == 4
    assert all(m.scaling["default"] == 16 / 4 for m in plain.values())
    assert all(m.scaling["default"] == 16 / math.sqrt(4) == 8.0 for m in rs.values())

    dora = _peft_layers(_apply("tiny-gpt2", "method=lora", "method.use_dora=true"), "lora_A")
    assert list(dora) == ["base_model.model.transformer.h.0.attn.c_attn", "base_model.model.transformer.h.1.attn.c_attn"]
    for layer in dora.values():
        # DoRA's magnitude starts as the norm of each output unit's weights (Conv1D stores W transposed)
        W = layer.base_layer.weight.T
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, W.norm(dim=1))


def test_ia3_defaults_and_identity_init() -> None:
    model = _apply("tiny-bert", "method=ia3")
    layers = _peft_layers(model, "ia3_l")
    names = {n.removeprefix("base_model.model.bert.encoder.") for n in layers}
    assert names == {f"layer.{i}.{m}" for i in (0, 1) for m in ("attention.self.key", "attention.self.value", "output.dense")}
    assert {n for n, m in layers.items() if m.is_feedforward} == {n for n in layers if n.endswith(".output.dense")}
    assert all(torch.equal(m.ia3_l["default"], torch.ones_like(m.ia3_l["default"])) for m in layers.values())
    base, _, _ = _fresh("tiny-bert", [])  # scales start at 1: the adapted model is the base model
    ids = torch.tensor([[2, 40, 41, 3]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base.eval()(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(("model", "listed", "head"), [
    ("tiny-bert", "dense, key, query, value", "classifier"),
    ("tiny-gpt2", "c_attn, c_fc, c_proj", "score"),
])
def test_unknown_target_module_lists_linear_names(model: str, listed: str, head: str) -> None:
    with pytest.raises(ConfigError) as info:
        _apply(model, "method=lora", "method.target_modules=[c_attn,query,nope]")
    assert info.value.key == "method.target_modules"
    assert f"its linear modules are: {listed} " in str(info.value)
    assert head not in str(info.value)


def test_all_linear_skips_the_head_and_new_pooler() -> None:
    targets = set(_peft_layers(_apply("tiny-bert", "method=lora", "method.target_modules=all-linear"), "lora_A"))
    assert len(targets) == 2 * 6  # q, k, v, attention output, intermediate, output per block
    assert not any("pooler" in n or "classifier" in n for n in targets)


# --------------------------------------------------------------------------- trained runs: lora, dora, ia3
MERGEABLE = [("lora", []), ("dora", ["method.use_dora=true"]), ("ia3", [])]
CASES = [(name, model) for name, _ in MERGEABLE for model in MODELS]


def _canonical(name: str) -> str:
    """A peft parameter name -> the base checkpoint's name for the same tensor."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace(".original_module.", ".")


def _logits(model: nn.Module, obj: ClassificationObjective, batches) -> torch.Tensor:
    return obj.logits(model, batches, batch_size=32, runtime=Runtime.cpu())[0]


@pytest.mark.parametrize(("variant", "model"), CASES, ids=[f"{v}-{m}" for v, m in CASES])
def test_trained_run_reloads_and_merges(variant: str, model: str, data: tuple[Path, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    method = "ia3" if variant == "ia3" else "lora"
    extra = dict(MERGEABLE)[variant]
    module = importlib.import_module(get_method(method).module)
    captured: dict[str, nn.Module] = {}
    real_apply = module.apply
    monkeypatch.setattr(module, "METHOD", dataclasses.replace(module.METHOD, apply=lambda m, run, ctx: captured.setdefault("model", real_apply(m, run, ctx))))
    train_csv, val_csv = data
    out = tmp_path / "run"
    train(load_config(None, [
        f"model={model}", f"method={method}", *extra, f"data.train={train_csv}", f"data.validation={val_csv}",
        "train.batch_size=8", "train.max_steps=5", "train.log_steps=1", "train.warmup_steps=0",
        "train.schedule=constant", "train.lr=5e-3", "train.precision=fp32", "train.tensorboard=false",
        "train.seed=0", f"output_dir={out}"]), quiet=True)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train" and "loss" in r]
    assert losses[-1] < losses[0], losses

    # frozen weights are bit-identical to the pretrained checkpoint file
    trained = captured["model"]
    base_file = load_file(str(resolve_model(model) / "model.safetensors"))
    frozen = {_canonical(n): p for n, p in trained.named_parameters() if not p.requires_grad}
    backbone = [k for k in base_file if k.startswith(BACKBONE[model])]
    assert backbone and all(torch.equal(frozen[k], base_file[k]) for k in backbone)

    # save -> load_trained and plain PeftModel.from_pretrained reproduce the logits
    run_cfg = load_config(out / "config.yaml")
    obj = ClassificationObjective(run_cfg)
    built = obj.from_saved(out / "model")
    batches = obj.prepare(obj.read_split(val_csv), built.tokenizer, run_cfg)
    reference = _logits(trained, obj, batches)
    # to float rounding, not bit for bit: the trained model runs the fused CPU LoRA layers (`methods.lora.fused`),
    # the reloaded one peft's, and on the first-token last layer's [B, 1, H] inputs they round differently (4e-9)
    torch.testing.assert_close(_logits(built.model, obj, batches), reference, atol=1e-6, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(model),
                                                              config=AutoConfig.from_pretrained(out / "model"))
    plain_peft = PeftModel.from_pretrained(base, out / "model")
    torch.testing.assert_close(_logits(plain_peft, obj, batches), reference, atol=1e-6, rtol=0)

    # merge: plain transformers weights, same outputs within 1e-4, loadable without tuneforge
    fresh = load_trained(AutoModelForSequenceClassification, out / "model", dtype=torch.float32)
    merged = get_method(method).runtime().merge(fresh)
    assert type(merged).__name__.endswith("ForSequenceClassification")
    assert not [k for k in merged.state_dict() if any(s in k for s in PEFT_MARKERS)]
    torch.testing.assert_close(_logits(merged, obj, batches), reference, atol=1e-4, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(reloaded, obj, batches), _logits(merged, obj, batches))


# --------------------------------------------------------------------------- prefix, ptuning_v2, prompt
def test_prefix_and_ptuning_v2_shapes() -> None:
    # a prefix token holds a key and a value per layer: width num_layers * 2 * kv_dim, where Llama's kv_dim is
    # num_key_value_heads * head_dim = 2 * 8 = 16 (grouped-query attention) and BERT's is hidden = 32
    prefix = {n: p.shape for n, p in _apply("tiny-llama", "method=prefix", "method.num_virtual_tokens=5",
                                            "method.projection_hidden=48").named_parameters() if p.requires_grad}
    assert prefix == {
        "prompt_encoder.default.embedding.weight": (5, 16),
        "prompt_encoder.default.transform.0.weight": (48, 16), "prompt_encoder.default.transform.0.bias": (48,),
        "prompt_encoder.default.transform.2.weight": (64, 48), "prompt_encoder.default.transform.2.bias": (64,),
        "base_model.score.modules_to_save.default.weight": (3, 32),
    }
    deep = {n: p.shape for n, p in _apply("tiny-bert", "method=ptuning_v2", "method.num_virtual_tokens=7")
            .named_parameters() if p.requires_grad}
    assert deep["prompt_encoder.default.embedding.weight"] == (7, 128)
    assert not any("transform" in n for n in deep)  # no reparameterisation MLP
    assert {n for n in deep if "modules_to_save" in n} == {
        f"base_model.{m}.modules_to_save.default.{w}" for m in ("bert.pooler.dense", "classifier") for w in ("weight", "bias")}


def test_prompt_inits() -> None:
    from transformers import AutoTokenizer

    text = "classify the sentiment"
    model = _apply("tiny-bert", "method=prompt", "method.num_virtual_tokens=8", "method.init=text",
                   f"method.init_text={text}")
    emb = model.word_embeddings.weight
    ids = AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))(text)["input_ids"]  # [CLS] ... [SEP]
    want = (ids * 8)[:8]  # peft repeats the encoded text to fill the prompt
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, emb[want])

    model = _apply("tiny-gpt2", "method=prompt", "method.num_virtual_tokens=6", "method.init=vocab")
    prompt = model.prompt_encoder["default"].embedding.weight
    vocab = model.word_embeddings.weight
    assert all(bool((vocab == row).all(-1).any()) for row in prompt)  # every row is a vocabulary embedding


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_prompt_on_decoders_pools_the_last_real_token(model: str) -> None:
    net = _apply(model, "method=prompt", "method.num_virtual_tokens=4").eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    pad = net.config.pad_token_id
    batch = TokenBatches({"input_ids": rows}, pad).collate([0, 1])
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0]  # right padding
    with torch.no_grad():
        padded = net(**batch).logits
        alone = torch.cat([net(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long))
                           .logits for r in rows])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prefix", "ptuning_v2", "prompt"])
def test_prompt_learning_refused_on_t5(method: str) -> None:
    with pytest.raises(ConfigError) as info:
        _apply("tiny-t5", f"method={method}")
    assert info.value.key == "method"
    assert f"method '{method}' does not work with the 't5' architecture (T5ForSequenceClassification)" in str(info.value)


# --------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(("overrides", "key", "text"), [
    (["method=prompt", "method.init=text"], "method", "method.init_text is required"),
    (["method=prompt", "method.init_text=hello"], "method", "only used with method.init=text"),
    (["method=prompt", "method.init=words"], "method.init", "'random', 'vocab' or 'text'"),
    (["method=lora", "method.target_modules=[]"], "method.target_modules", "at least one module name"),
    (["method=ia3", "method.target_modules=all-linear"], "method.target_modules", "list names"),
    (["method=ia3", "method.feedforward_modules=[down_proj]"], "method", "needs method.target_modules"),
    (["method=lora", "method.r=0"], "method.r", "greater than or equal to 1"),
])
def test_config_errors(overrides: list[str], key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert text in str(info.value)


def test_target_modules_accepts_a_comma_list() -> None:
    assert load_config(None, ["method=lora", "method.target_modules=q_proj, v_proj"]).method.target_modules == [
        "q_proj", "v_proj"]


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method=qlora"])
    assert info.value.key == "method"
    assert "pip install 'tuneforge[qlora]'" in str(info.value)
