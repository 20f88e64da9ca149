"""method=qat (quantization-aware training with torchao, Jacob et al. 2018) against torchao's own oracle.

* a prepared (fake-quantised) tiny BERT computes exactly what torchao's post-training quantisation of the same
  weights computes (``quantize_(model, base_config)``), and so does the converted model; with fake
  quantisation switched off it is the fp32 model again (int8 and int4 weights, per group and per channel);
* a short run raises accuracy above the untrained model's (0.33 -> 1.0 on 24 memorised rows); its ``qat`` block reports fp32,
  fake-quant and converted metrics; the saved folder reloads as the converted model (int weights) whose
  logits equal the trained fake-quant model's (tolerance 1e-6, measured 0), and ``tuneforge eval`` on the
  run gives the converted accuracy; merge writes plain ``nn.Linear`` layers;
* bad options (bits not 4/8, a group size that does not divide a layer's width) are config errors naming
  the key (QAT under LoRA: test_qat_lora.py); through the CLI, exit 2 with one line on stderr and no library noise.
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
from tuneforge.methods import MethodContext
from tuneforge.models.anatomy import head_parameter_names
from tuneforge.models.registry import resolve_model

pytest.importorskip("torchao")

from tuneforge.methods.qat import apply as qat  # after the importorskip

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


@pytest.mark.parametrize(("bits", "group"), OPTIONS, ids=[f"int{b}-g{g}" for b, g in OPTIONS])
def test_prepared_equals_torchao_ptq_and_converted(bits: str, group: str) -> None:
    model, head, batch = _tiny_bert()
    run = load_config(None, ["model=tiny-bert", "method=qat", f"method.weight_bits={bits}", f"method.group_size={group}"])
    fp32 = copy.deepcopy(model)
    ptq = copy.deepcopy(model)
    prepared = qat.apply(model, run, MethodContext(head, 2)).eval()
    layers = qat.targets(ptq, head)
    # 2 blocks x 6 linear layers; the head (classifier, and tiny-bert's pooler, newly initialised) stays fp32
    assert len(layers) == 12 and "classifier" not in layers and "bert.pooler.dense" not in layers
    qat._quantize(ptq, qat.base_config(run.method), layers)  # the oracle: torchao's post-training quantisation
    with torch.no_grad():
        want, ref = ptq(**batch).logits, fp32(**batch).logits
        got = prepared(**batch).logits
        converted = qat.convert(prepared, run.method)(**batch).logits
        with qat.fake_quant(prepared, enabled=False):
            unquantised = prepared(**batch).logits
    assert torch.equal(got, want), float((got - want).abs().max())
    assert torch.equal(converted, want), float((converted - want).abs().max())
    assert torch.equal(unquantised, ref)
    assert (got - ref).abs().max() > 0  # quantisation did change something
    assert type(prepared.classifier) is nn.Linear


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short QAT run on tiny-bert (int4 weights, group 32) that memorises 24 rows (validation = training
    rows: a random tiny model needs ~30 steps at 1e-2 to separate the classes at all; measured 0.33 -> 1.0)."""
    from tuneforge.pipeline import train

    root = tmp_path_factory.mktemp("qat")
    data = write_csv(root / "train.csv", make_rows(24))
    cfg = load_config(None, [
        "model=tiny-bert", "method=qat", "method.weight_bits=4", f"data.train={data}", f"data.validation={data}",
        "train.batch_size=12", "train.max_steps=30", "train.eval_steps=30", "train.lr=1e-2", "train.schedule=constant",
        "train.warmup_steps=0", "train.precision=fp32", "train.eval_on_start=true", "train.tensorboard=false",
        "train.seed=0", f"output_dir={root / 'run'}"])
    train(cfg, quiet=True)
    return root / "run"


def test_training_improves_and_reports_three_models(run_dir: Path) -> None:
    from tuneforge.track import read_metrics

    metrics = json.loads((run_dir / "metrics.json").read_text())
    evals = [r for r in read_metrics(run_dir) if r.get("split") == "eval"]
    start, final = evals[0]["accuracy"], metrics["splits"]["validation"]["accuracy"]
    assert evals[0]["step"] == 0 and final >= start + 0.3, (start, final)
    block = metrics["qat"]
    assert block["weight_bits"] == 4 and block["group_size"] == 32
    v = block["validation"]
    assert set(v) == {"fp32", "fake_quant", "converted"}
    assert v["fake_quant"]["accuracy"] == final  # the headline numbers are the trained (fake-quant) model's
    assert v["converted"]["accuracy"] == v["fake_quant"]["accuracy"]
    assert v["converted"]["loss"] == pytest.approx(v["fake_quant"]["loss"], abs=1e-6)
    assert 0 < v["fp32"]["accuracy"] <= 1 and v["fp32"]["loss"] != v["fake_quant"]["loss"]
    assert block["bytes"]["converted"] < block["bytes"]["fp32"]
    assert "## Quantization-aware training" in (run_dir / "report.md").read_text()


def test_saved_model_loads_converted_and_equals_fake_quant(run_dir: Path) -> None:
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from tuneforge.engine.runtime import Runtime
    from tuneforge.inference import evaluate_file
    from tuneforge.methods.saved import read_manifest
    from tuneforge.objectives.classification import ClassificationObjective

    manifest = read_manifest(run_dir / "model")
    assert manifest["method"] == "qat" and manifest["base_model"] == "."  # self-contained: fp32 weights inside
    run = load_config(run_dir / "config.yaml")
    obj = ClassificationObjective(run)
    built = obj.from_saved(run_dir / "model")
    query = built.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.weight, IntxUnpackedToInt8Tensor)
    assert type(built.model.classifier.weight) is nn.Parameter

    # the trained model as it was at the end of training: the fp32 weights prepared again
    from transformers import AutoModelForSequenceClassification

    fresh = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    layers = json.loads((run_dir / "model" / qat.LAYERS_FILE).read_text())["layers"]
    qat.prepare(fresh, run.method, layers)
    batches = obj.prepare(obj.read_split(Path(run.data.validation)), built.tokenizer, run)
    loaded, _ = obj.logits(built.model, batches, batch_size=32, runtime=Runtime.cpu())
    trained, _ = obj.logits(fresh, batches, batch_size=32, runtime=Runtime.cpu())
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=0)

    flat = evaluate_file(run_dir, Path(run.data.validation), [])
    assert flat["accuracy"] == json.loads((run_dir / "metrics.json").read_text())["qat"]["validation"]["converted"]["accuracy"]

    merged = qat.merge(built.model)
    assert all(type(merged.get_submodule(p).weight) is nn.Parameter for p in layers)


@pytest.mark.parametrize(("override", "key", "text"), [
    ("method.weight_bits=3", "method.weight_bits", "4 or 8"),
    ("method.group_size=24", "method.group_size", "does not divide the input width"),
    ("method.group_size=0", "method.group_size", "positive"),
])
def test_bad_options_name_the_key(override: str, key: str, text: str) -> None:
    with pytest.raises(ConfigError, match=text) as err:
        load_config(None, ["model=tiny-bert", "method=qat", override])
    assert err.value.key == key


def test_cli_bad_group_size_exits_2_with_one_quiet_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TUNEFORGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "validate", "model=tiny-bert", "method=qat",
                           "method.group_size=24"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "method.group_size" in lines[0], proc.stderr
