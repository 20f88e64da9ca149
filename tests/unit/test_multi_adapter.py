"""Several saved method folders on one loaded base (``MethodRuntime.attach`` / ``activate``, for a server).

Two adapters of a method are made on tiny models with different seeds and moved far from their init (so
they differ from each other and from the base), saved with `save_trained` into two folders; one freshly
loaded base gets both attached as "a" and "b". ``activate("a")`` computes exactly as `load_trained` of
folder a alone, ``activate("b")`` as folder b alone, and switching back restores a. Methods that cannot
hold several adapters say why (``multi_unsupported``), and the `MethodRuntime` invariants hold for every
registered method.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from tuneforge.config import load_config
from tuneforge.methods import METHODS, MethodContext, MethodRuntime, get_method
from tuneforge.methods.saved import load_trained, read_manifest, save_trained
from tuneforge.models import resolve_model
from tuneforge.models.anatomy import head_parameter_names

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
L = 7

# (method, model): the methods that attach, on a classifier (each adapter has its own head).
CASES = [
    ("lora", "tiny-gpt2"),
    ("lora", "tiny-bert"),
    ("ia3", "tiny-bert"),
    ("prefix", "tiny-bert"),
    ("ptuning_v2", "tiny-gpt2"),
    ("prompt", "tiny-gpt2"),
    ("qlora", "tiny-bert"),
]


def _cls(model: str) -> type:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def _base(model: str) -> tuple[nn.Module, MethodContext]:
    from transformers import AutoTokenizer

    path = resolve_model(model)
    torch.manual_seed(0)
    m, info = _cls(model).from_pretrained(path, num_labels=3, output_loading_info=True)
    if m.config.pad_token_id is None:
        m.config.pad_token_id = AutoTokenizer.from_pretrained(path).eos_token_id
    return m, MethodContext(head_parameter_names(m, info["missing_keys"]), 2)


def _train(method: str, model: str, seed: int, folder: Path, extra: tuple[str, ...] = ()) -> None:
    """Apply ``method`` with ``seed``, move every trainable tensor far (stand-in for training), save."""
    m, ctx = _base(model)
    run = load_config(None, [f"model={model}", f"method={method}", *extra])
    torch.manual_seed(seed)
    m = get_method(method).runtime().apply(m, run, ctx)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)
    folder.mkdir(parents=True)
    save_trained(m, folder, run.method, resolve_model(model))


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (4, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(("method", "model"), CASES, ids=[f"{m}-{x}" for m, x in CASES])
def test_attach_two_adapters_and_switch(method: str, model: str, tmp_path: Path) -> None:
    if method == "qlora" and not HAS_BNB:
        pytest.skip("qlora needs bitsandbytes")
    a, b = tmp_path / "a", tmp_path / "b"
    _train(method, model, 1, a)
    _train(method, model, 2, b)
    assert read_manifest(a)["method"] == method

    runtime = get_method(method).runtime()
    assert runtime.attach is not None and runtime.activate is not None
    base, _ = _base(model)
    batch = _batch(base.config.vocab_size)
    served = runtime.attach(base, a, "a")
    served = runtime.attach(served, b, "b")

    alone_a = _logits(load_trained(_cls(model), a), batch)
    alone_b = _logits(load_trained(_cls(model), b), batch)
    assert (alone_a - alone_b).abs().max() > 1e-2, "the two adapters should compute differently"

    runtime.activate(served, "a")
    torch.testing.assert_close(_logits(served, batch), alone_a, atol=1e-5, rtol=0)
    runtime.activate(served, "b")
    torch.testing.assert_close(_logits(served, batch), alone_b, atol=1e-5, rtol=0)
    runtime.activate(served, "a")
    torch.testing.assert_close(_logits(served, batch), alone_a, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in served.parameters()), "attached adapters serve in inference mode"

    with pytest.raises(ValueError, match="already attached"):
        runtime.attach(served, a, "a")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        runtime.activate(served, "c")


def test_attach_refuses_another_adapter_type(tmp_path: Path) -> None:
    _train("lora", "tiny-bert", 1, tmp_path / "lora")
    _train("ia3", "tiny-bert", 1, tmp_path / "ia3")
    base, _ = _base("tiny-bert")
    served = get_method("lora").runtime().attach(base, tmp_path / "lora", "a")
    with pytest.raises(ValueError, match="adapter type"):
        get_method("ia3").runtime().attach(served, tmp_path / "ia3", "b")


@pytest.mark.skipif(not HAS_BNB, reason="qlora needs bitsandbytes")
def test_attach_refuses_mixing_quantised_and_plain_bases(tmp_path: Path) -> None:
    _train("lora", "tiny-bert", 1, tmp_path / "lora")
    _train("qlora", "tiny-bert", 1, tmp_path / "qlora")
    _train("qlora", "tiny-bert", 2, tmp_path / "qlora-dq", ("method.double_quant=false",))
    lora, qlora = get_method("lora").runtime(), get_method("qlora").runtime()

    served = lora.attach(_base("tiny-bert")[0], tmp_path / "lora", "a")
    with pytest.raises(ValueError, match="trained on a 4-bit NF4 base"):
        qlora.attach(served, tmp_path / "qlora", "b")

    served = qlora.attach(_base("tiny-bert")[0], tmp_path / "qlora", "a")
    with pytest.raises(ValueError, match="trained on the plain base"):
        lora.attach(served, tmp_path / "lora", "b")
    with pytest.raises(ValueError, match="double_quant=False"):
        qlora.attach(served, tmp_path / "qlora-dq", "c")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_runtime_invariants(method: str) -> None:
    runtime = get_method(method).runtime()
    assert isinstance(runtime, MethodRuntime)
    assert (runtime.save is None) == (runtime.load is None)
    assert (runtime.attach is None) == (runtime.activate is None)
    assert runtime.reference is not None, f"method '{method}' has no reference context"
    assert (runtime.merge is None) or not runtime.merge_unsupported
    if runtime.attach is None:
        assert isinstance(runtime.multi_unsupported, str) and runtime.multi_unsupported.strip(), (
            f"method '{method}' cannot attach but does not say why")
    else:
        assert runtime.multi_unsupported is None
        assert runtime.save is not None, "attach loads saved method folders: the method saves one"
