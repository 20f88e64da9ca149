"""`models.first_token`: the last encoder layer computes only the token the classification head reads."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from tuneforge.models.first_token import enable_first_token_last_layer, last_encoder_layer

TINY = {"vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "num_labels": 3, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}


def _batch() -> dict[str, torch.Tensor]:
    """Three rows of different lengths (right padding), so the mask matters."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _models():
    torch.manual_seed(0)
    yield BertForSequenceClassification(BertConfig(**TINY, attn_implementation="sdpa"))
    torch.manual_seed(0)
    yield BertForSequenceClassification(BertConfig(**TINY, attn_implementation="eager"))
    torch.manual_seed(0)
    yield RobertaForSequenceClassification(RobertaConfig(**TINY, pad_token_id=1, attn_implementation="sdpa"))


@pytest.mark.parametrize("model", list(_models()), ids=["bert-sdpa", "bert-eager", "roberta-sdpa"])
def test_logits_and_every_gradient_equal_the_full_layer(model: nn.Module):
    batch, labels = _batch(), torch.tensor([0, 2, 1])
    full = copy.deepcopy(model).train()
    assert enable_first_token_last_layer(model, batch)
    assert type(last_encoder_layer(model)).__name__.startswith("FirstToken")
    model.train()
    ref, out = full(**batch), model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    nn.functional.cross_entropy(ref.logits, labels).backward()
    nn.functional.cross_entropy(out.logits, labels).backward()
    for (name, p), q in zip(model.named_parameters(), full.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_last_layer_outputs_one_position_only():
    model = next(_models()).eval()
    enable_first_token_last_layer(model, _batch())
    with torch.no_grad():
        hidden = model.base_model(**_batch()).last_hidden_state
    assert hidden.shape == (3, 1, 32)


def test_lora_wrapped_model_is_swapped_and_equal():
    from peft import LoraConfig, get_peft_model

    base = next(_models())
    ref = copy.deepcopy(base)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    torch.manual_seed(1)
    ref = get_peft_model(ref, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    for p in model.parameters():  # nonzero B so the adapters change the output
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    ref.load_state_dict(model.state_dict())
    assert enable_first_token_last_layer(model, _batch())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**_batch()).logits, ref.eval()(**_batch()).logits, atol=1e-6, rtol=1e-5)


def test_other_architectures_keep_their_layers():
    batch = _batch()
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, num_labels=3,
                                                    pad_token_id=1))
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4,
                                                                  hidden_dim=64, num_labels=3))
    for model in (gpt2, distil):
        assert last_encoder_layer(model) is None
        assert not enable_first_token_last_layer(model, batch)


def test_a_head_that_reads_another_token_undoes_the_swap():
    """The check on the first batch is what decides: a head reading the last position gets the full layer back."""

    class LastTokenForSequenceClassification(BertForSequenceClassification):
        def forward(self, **inputs):
            return SimpleNamespace(logits=self.classifier(self.bert(**inputs).last_hidden_state[:, -1]))

    torch.manual_seed(0)
    model = LastTokenForSequenceClassification(BertConfig(**TINY))
    assert last_encoder_layer(model) is not None
    assert not enable_first_token_last_layer(model, _batch())
    assert type(last_encoder_layer(model)).__name__ == "BertLayer"


def test_an_encoder_shared_with_other_heads_is_left_alone():
    """A multi-task model's view (an encoder whose other heads read every token) is not a sequence classifier."""
    bert = next(_models())

    class View:  # what objectives.multitask.TaskView is: calls and attributes forwarded
        def __call__(self, **inputs):
            return bert(**inputs)

        def __getattr__(self, name):
            return getattr(bert, name)

    assert last_encoder_layer(View()) is None
    assert not enable_first_token_last_layer(View(), _batch())
    assert type(last_encoder_layer(bert)).__name__ == "BertLayer"


def test_feature_batches_and_prefix_caches_are_left_alone():
    model = next(_models())
    assert not enable_first_token_last_layer(model, {"features": torch.zeros(3, 32)})
    assert type(last_encoder_layer(model)).__name__ == "BertLayer"
