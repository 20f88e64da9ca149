"""QAT under LoRA (``method: lora`` with ``qat: {weight_bits, group_size}``) against torchao's own oracle.

* the prepared model (fake-quantised base, LoRA trainable, with non-zero B so the update matters) computes
  exactly what torchao's post-training quantisation of the *merged* fp32 weights computes, and so does the
  converted model; with fake quantisation off it is plain fp32 LoRA (int8/int4, per group and per channel);
* only LoRA and the head train; a short run raises accuracy (its ``qat`` block reports fp32, fake-quant and
  converted); the saved adapter loads merged and quantised (int weights), with logits equal to the trained
  fake-quant model's; ``tuneforge eval`` gives the converted accuracy, ``predict`` and ``merge`` work;
* bad options are config errors naming the key; through the CLI, exit 2.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_rows, write_csv
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.methods import MethodContext, get_method
from tuneforge.models.anatomy import head_parameter_names
from tuneforge.models.registry import resolve_model

pytest.importorskip("torchao")

from tuneforge.methods.qat import apply as qat  # after the importorskip
from tuneforge.methods.qat import lora as qat_lora

OPTIONS = [("8", "32"), ("4", "32"), ("4", "per_channel")]


def _tiny_bert() -> tuple[nn.Module, set[str], dict[str, torch.Tensor]]:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m, info = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny-bert"), num_labels=3,
                                                                 output_loading_info=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, m.config.vocab_size, (4, 9), generator=g)
    return m.eval(), head_parameter_names(m, info["missing_keys"]), {"input_ids": ids,
                                                                      "attention_mask": torch.ones_like(ids)}


def _prepared(bits: str, group: str, targets: str = "query,value") -> tuple[nn.Module, nn.Module, dict, object]:
    """(prepared peft model with random non-zero B, an fp32 copy of the model before prepare, batch, run)."""
    model, head, batch = _tiny_bert()
    run = load_config(None, ["model=tiny-bert", "method=lora", f"method.target_modules={targets}",
                             f"method.qat.weight_bits={bits}", f"method.qat.group_size={group}"])
    fp32 = copy.deepcopy(model)
    wrapped = get_method("lora").runtime().apply(model, run, MethodContext(set(head), 2))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return wrapped.eval(), fp32, batch, run


@pytest.mark.parametrize(("bits", "group"), OPTIONS, ids=[f"int{b}-g{g}" for b, g in OPTIONS])
def test_prepared_equals_torchao_ptq_of_merged_weights(bits: str, group: str) -> None:
    prepared, _, batch, run = _prepared(bits, group)
    hf = prepared.get_base_model()
    layers = qat_lora.layers_of(prepared)
    # every backbone linear (2 blocks x 6) is fake-quantised; LoRA sits on query/value; the head stays fp32
    assert len(layers) == 12 and "classifier" not in layers and "bert.pooler.dense" not in layers
    assert type(hf.bert.encoder.layer[0].attention.self.query) is qat_lora.QatLoraLinear
    assert type(hf.bert.encoder.layer[0].attention.self.key).__name__ == "FakeQuantizedLinear"
    trainable = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)

    with torch.no_grad():
        plain = copy.deepcopy(prepared)
        with qat.fake_quant(plain, enabled=False):  # fp32 LoRA, merged into plain fp32 weights
            lora_fp32 = plain(**batch).logits
            merged = plain.merge_and_unload()
        for p in layers:  # back to plain nn.Linear holding W + s·BA: the PTQ oracle's input
            fq = merged.get_submodule(p)
            parent, _, name = p.rpartition(".")
            setattr(merged.get_submodule(parent), name, fq.to_linear())
        delattr(merged, qat._LAYERS_ATTR)
        assert merged(**batch).logits.sub(lora_fp32).abs().max() < 1e-5  # the merge itself is exact (fp32)
        qat._quantize(merged, qat.base_config(run.method.qat), layers)  # torchao's post-training quantisation
        want = merged(**batch).logits
        got = prepared(**batch).logits
        converted = qat_lora.convert(prepared, run.method.qat)(**batch).logits
    assert torch.equal(got, want), float((got - want).abs().max())
    assert torch.equal(converted, want), float((converted - want).abs().max())
    assert (got - lora_fp32).abs().max() > 0  # quantisation did change something


def test_reference_is_the_fp32_base() -> None:
    prepared, fp32, batch, _ = _prepared("4", "32")
    ref = get_method("lora").runtime().reference(prepared)
    with torch.no_grad(), ref() as base:
        got = base(**batch).logits
    with torch.no_grad():
        want = fp32(**batch).logits
        trained = prepared(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (trained - want).abs().max() > 1e-5  # LoRA (B != 0) and the rounding change the logits
    with torch.no_grad():  # the context restored fake quantisation and the adapters
        assert torch.equal(prepared(**batch).logits, trained)


def test_gradients_reach_lora_through_the_rounding() -> None:
    prepared, _, batch, _ = _prepared("4", "32")
    prepared.train()
    prepared(**batch, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    grads = {n: p.grad for n, p in prepared.named_parameters() if "lora_A" in n or "lora_B" in n}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short QAT-under-LoRA run on tiny-bert (int4 weights, group 32, all linear layers) memorising 24 rows
    (measured at lr 3e-3: accuracy 0.33 -> 0.67; over train.seed 0-3 0.63-0.96, and 0.67/0.79 for seeds 0/1
    with train.first_token_last_layer=false. At lr 5e-3 seed 0 diverged back to chance after step 30 once the
    last layer's dropout stream changed, while seeds 1-3 reached 0.71-1.0: too close to the edge for a test)."""
    from tuneforge.pipeline import train

    root = tmp_path_factory.mktemp("qat-lora")
    data = write_csv(root / "train.csv", make_rows(24))
    cfg = load_config(None, [
        "model=tiny-bert", "method=lora", "method.qat.weight_bits=4", "method.target_modules=all-linear",
        f"data.train={data}", f"data.validation={data}", "train.batch_size=12", "train.max_steps=60",
        "train.eval_steps=60", "train.lr=3e-3", "train.schedule=constant", "train.warmup_steps=0",
        "train.precision=fp32", "train.eval_on_start=true", "train.tensorboard=false", "train.seed=0",
        f"output_dir={root / 'run'}"])
    train(cfg, quiet=True)
    return root / "run"


def test_training_improves_and_reports_three_models(run_dir: Path) -> None:
    from tuneforge.track import read_metrics

    metrics = json.loads((run_dir / "metrics.json").read_text())
    evals = [r for r in read_metrics(run_dir) if r.get("split") == "eval"]
    start, final = evals[0]["accuracy"], metrics["splits"]["validation"]["accuracy"]
    assert evals[0]["step"] == 0 and final >= start + 0.2, (start, final)
    block = metrics["qat"]
    assert block["weight_bits"] == 4 and block["group_size"] == 32
    v = block["validation"]
    assert v["fake_quant"]["accuracy"] == final
    assert v["converted"]["accuracy"] == v["fake_quant"]["accuracy"]
    assert v["converted"]["loss"] == pytest.approx(v["fake_quant"]["loss"], abs=1e-6)
    assert v["fp32"]["loss"] != v["fake_quant"]["loss"]
    assert block["bytes"]["converted"] < block["bytes"]["fp32"]
    assert (run_dir / "model" / "adapter_model.safetensors").is_file()  # the saved thing is the adapter


def test_saved_adapter_loads_converted_and_equals_fake_quant(run_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from transformers import AutoModelForSequenceClassification

    from tuneforge.engine.runtime import Runtime
    from tuneforge.export import merge_run
    from tuneforge.inference import evaluate_file, predict_texts
    from tuneforge.methods.saved import read_manifest
    from tuneforge.objectives.classification import ClassificationObjective

    manifest = read_manifest(run_dir / "model")
    assert manifest["method"] == "lora" and manifest["options"]["qat"] == {"weight_bits": 4, "group_size": 32}
    run = load_config(run_dir / "config.yaml")
    obj = ClassificationObjective(run)
    built = obj.from_saved(run_dir / "model")
    query = built.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.weight, IntxUnpackedToInt8Tensor) and not isinstance(built.model, PeftModel)

    # the trained model as it was at the end of training: base prepared again, the adapter on top
    base = AutoModelForSequenceClassification.from_pretrained(manifest["base_model"], num_labels=3).eval()
    layers = json.loads((run_dir / "model" / qat.LAYERS_FILE).read_text())["layers"]
    qat.prepare(base, run.method.qat, layers)
    fresh = PeftModel.from_pretrained(base, run_dir / "model").eval()
    assert qat_lora.swap_lora_layers(fresh) == 12
    batches = obj.prepare(obj.read_split(Path(run.data.validation)), built.tokenizer, run)
    loaded, _ = obj.logits(built.model, batches, batch_size=32, runtime=Runtime.cpu())
    trained, _ = obj.logits(fresh, batches, batch_size=32, runtime=Runtime.cpu())
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    flat = evaluate_file(run_dir, Path(run.data.validation), [])
    assert flat["accuracy"] == metrics["qat"]["validation"]["converted"]["accuracy"]
    preds = predict_texts(run_dir, ["a fine day", "a dreadful day"], None, [])
    assert len(preds) == 2 and all(p["label"] in {"positive", "negative", "neutral"} for p in preds)

    res = merge_run(run_dir, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(res.out_dir).eval()
    assert type(plain.bert.encoder.layer[0].attention.self.query.weight) is nn.Parameter
    assert res.max_abs_diff < 0.05  # the dequantised weights without the int8 activation rounding


def test_server_refuses_to_attach_a_qat_adapter(run_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny-bert"), num_labels=3)
    with pytest.raises(ValueError, match=r"method\.qat"):
        get_method("lora").runtime().attach(base, run_dir / "model", "a")


@pytest.mark.parametrize(("overrides", "key", "text"), [
    (["method.qat.weight_bits=3"], "method.qat.weight_bits", "4 or 8"),
    (["method.qat.group_size=24"], "method.qat.group_size", "does not divide the input width"),
    (["method.qat.group_size=0"], "method.qat.group_size", "positive"),
    (["method.qat.weight_bits=4", "method.dropout=0.1"], "method", "dropout"),
    (["method.qat.weight_bits=4", "method.use_dora=true"], "method", "use_dora"),
    (["method.qat.bits=4"], "method.qat.bits", "unknown key"),
])
def test_bad_options_name_the_key(overrides: list[str], key: str, text: str) -> None:
    with pytest.raises(ConfigError, match=text) as err:
        load_config(None, ["model=tiny-bert", "method=lora", *overrides])
    assert err.value.key == key


def test_qlora_refuses_qat() -> None:
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError, match="already quantised"):
        load_config(None, ["model=tiny-bert", "method=qlora", "method.qat.weight_bits=4"])


def test_dropout_defaults_to_zero_under_qat() -> None:
    assert load_config(None, ["model=tiny-bert", "method=lora", "method.qat.weight_bits=4"]).method.dropout == 0
    assert load_config(None, ["model=tiny-bert", "method=lora"]).method.dropout == 0.05


def test_cli_bad_group_size_exits_2_with_one_quiet_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TUNEFORGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "validate", "model=tiny-bert", "method=lora",
                           "method.qat.group_size=24"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "method.qat.group_size" in lines[0], proc.stderr
