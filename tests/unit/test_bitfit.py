"""BitFit: exactly the bias terms (plus the head) train, counted by formula; bias-free architectures are
refused at config validation; the saved file holds biases + head only; merge is the identity and the merged
model saves as a self-contained transformers folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.methods.base import MethodContext
from tuneforge.methods.bitfit import apply as bitfit
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names, trainable_summary

H, FFN, LAYERS, LABELS = 32, 64, 2, 3  # tiny-bert: hidden, intermediate, blocks, classes


def _bert():
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("tiny-bert"), num_labels=LABELS, output_loading_info=True)
    return model, head_parameter_names(model, info["missing_keys"])


def test_trains_exactly_the_biases_and_head() -> None:
    model, head = _bert()
    bitfit.apply(model, load_config(None, ["method=bitfit", "model=tiny-bert"]), MethodContext(head, LAYERS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(".bias")} | head
    # per BERT layer: q, k, v, attention-output and FFN-output biases (h each), FFN-intermediate (FFN), two
    # LayerNorm biases (h each) = 7h + FFN; plus the embedding LayerNorm bias (h)
    backbone = LAYERS * (7 * H + FFN) + H
    head_size = H * H + H + H * LABELS + LABELS  # pooler (newly initialised) + classifier
    assert trainable_summary(model)[0] == backbone + head_size == 608 + 1155


@pytest.mark.parametrize(("model", "arch"), [("tiny-llama", "LlamaModel"), ("tiny-t5", "T5Model")])
def test_bias_free_models_are_refused_at_validation(model: str, arch: str) -> None:
    with pytest.raises(ConfigError, match="has none in its backbone") as info:
        load_config(None, ["method=bitfit", f"model={model}"])
    assert info.value.key == "method"
    assert arch in str(info.value) and "adapter" in str(info.value)  # names why and what to use instead


def test_save_load_merge(tmp_path: Path, tiny_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from tuneforge.methods.saved import load_trained
    from tuneforge.pipeline import train

    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)
    cfg = load_config(None, [f"data.train={tiny_csv(40)}", "model=tiny-bert", "method=bitfit", "train.max_steps=3",
                             "train.batch_size=8", "train.precision=fp32", "train.tensorboard=false",
                             f"output_dir={tmp_path / 'run'}"])
    folder = train(cfg, quiet=True).run_dir / "model"
    saved = load_file(str(folder / bitfit.WEIGHTS_FILE))
    assert all(n.endswith(".bias") or n.startswith(("classifier.", "bert.pooler.")) for n in saved)
    assert sum(t.numel() for t in saved.values()) == 608 + 1155
    assert not (folder / "model.safetensors").exists()

    loaded = load_trained(AutoModelForSequenceClassification, folder).eval()
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny-bert"), num_labels=3)
    for n, p in loaded.named_parameters():  # every non-bias backbone weight is the pretrained one
        if not n.endswith(".bias") and not n.startswith(("classifier.", "bert.pooler.")):
            assert torch.equal(p, dict(base.named_parameters())[n]), n
    merged = bitfit.merge(loaded)
    assert merged is loaded
    merged.save_pretrained(tmp_path / "plain")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    ids = torch.tensor([[2, 50, 60, 70, 3], [2, 80, 90, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, loaded(**batch).logits)
