"""``train.sparse_embeddings``: row-sparse word-embedding gradients and lazy AdamW (`engine.sparse_rows`);
``train.embedding_row_grads``: the same row gradients scattered into a kept dense one for dense AdamW.

Against torch as the reference: the clipping equals ``clip_grad_norm_`` on the dense gradient; a step whose
batch uses every row equals fused dense AdamW; on a step that leaves rows out the used rows still equal dense
AdamW and the unused ones keep their weights (dense AdamW would have decayed them by ``lr x wd``, the bounded
difference the option documents). End to end: a run learns, resumes exactly, and bad combinations name the key.
Exact row gradients equal dense AdamW on steps that leave rows out, and a run with them tracks the dense run
to float rounding, resumes bit for bit, and stays off where it does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import interrupt_after_checkpoint
from tuneforge.config import load_config
from tuneforge.engine.sparse_rows import (
    DenseRowsAdamW,
    RowSparseAdamW,
    clip_grad_norm,
    enable_sparse_embedding,
)
from tuneforge.errors import ConfigError
from tuneforge.pipeline import train

LR, WD = 0.05, 0.1


class _Bag(nn.Module):
    """Mean of looked-up rows -> linear: the smallest model with an input embedding."""

    def __init__(self, vocab: int = 12, dim: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, 2)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids).mean(1))


def _pair(sparse: bool, exact: bool = False) -> tuple[_Bag, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Bag()
    if sparse:
        enable_sparse_embedding(model)
    groups = [{"params": [model.emb.weight, model.out.weight], "lr": LR, "weight_decay": WD},
              {"params": [model.out.bias], "lr": LR, "weight_decay": 0.0}]
    if not sparse:
        return model, torch.optim.AdamW(groups, fused=True)
    return model, DenseRowsAdamW(groups) if exact else RowSparseAdamW(groups)


def _step(model: _Bag, opt: torch.optim.Optimizer, ids: torch.Tensor, sparse: bool, scale: float = 1.0) -> float:
    y = torch.tensor([0, 1, 1, 0])[: len(ids)]
    nn.functional.cross_entropy(model(ids), y).mul(scale).backward()
    params = list(model.parameters())
    norm = clip_grad_norm(params, 0.5) if sparse else torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def test_clipping_equals_torch_on_the_dense_gradient() -> None:
    ids = torch.tensor([[1, 2, 2, 5], [5, 7, 1, 1]])
    norms, grads = [], []
    for sparse in (False, True):
        model, _ = _pair(sparse)
        nn.functional.cross_entropy(model(ids), torch.tensor([0, 1])).mul(30).backward()  # a norm above 0.5
        params = list(model.parameters())
        norms.append(float(clip_grad_norm(params, 0.5) if sparse else torch.nn.utils.clip_grad_norm_(params, 0.5)))
        grads.append([p.grad.to_dense() for p in params])
    assert norms[0] > 0.5 and norms[1] == pytest.approx(norms[0], rel=1e-6)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_steps_using_every_row_equal_dense_adamw() -> None:
    every = torch.arange(12).view(2, 6)  # both rows of every batch together use all 12 embedding rows
    batches = [every, every.flip(1), every[[1, 0]]]
    runs = []
    for sparse in (False, True):
        model, opt = _pair(sparse)
        for ids in batches:
            _step(model, opt, ids, sparse)
        runs.append((model, opt))
    (dense, dopt), (lazy, lopt) = runs
    for p, q in zip(dense.parameters(), lazy.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    # the same optimizer state layout (a checkpoint of either loads into the other)
    d, s = dopt.state[dense.emb.weight], lopt.state[lazy.emb.weight]
    assert float(d["step"]) == float(s["step"]) == 3
    assert torch.allclose(d["exp_avg_sq"], s["exp_avg_sq"], atol=1e-9)


def test_unused_rows_are_left_alone_used_rows_get_adamw() -> None:
    ids = torch.tensor([[1, 2, 2], [5, 1, 7]])
    used, unused = [1, 2, 5, 7], [0, 3, 4, 6, 8, 9, 10, 11]
    (dense, dopt), (lazy, lopt) = _pair(False), _pair(True)
    start = dense.emb.weight.detach().clone()
    for ids_ in (ids, ids):
        _step(dense, dopt, ids_, False)
        _step(lazy, lopt, ids_, True)
    # the rows the batches used: AdamW's update either way
    assert torch.allclose(dense.emb.weight[used], lazy.emb.weight[used], atol=1e-6)
    # the rest: dense AdamW only decayed them (their moments are zero), twice by (1 - lr * wd)
    assert torch.equal(lazy.emb.weight[unused], start[unused])
    assert torch.allclose(dense.emb.weight[unused], start[unused] * (1 - LR * WD) ** 2, atol=1e-7)
    assert torch.count_nonzero(lopt.state[lazy.emb.weight]["exp_avg"][unused]) == 0


def _run(tmp_path: Path, data: Path, *overrides: str, name: str = "run") -> Any:
    cfg = load_config(None, ["model=tiny-bert", f"data.train={data}", "train.batch_size=8", "train.precision=fp32",
                             "train.log_steps=1", "train.tensorboard=false", "train.sparse_embeddings=true",
                             *overrides, f"output_dir={tmp_path / name}"])
    return train(cfg, overwrite=True, quiet=True)


def test_run_tracks_dense_adamw_and_resumes_exactly(tmp_path: Path, tiny_csv: Callable[..., Path]) -> None:
    """On tiny-bert (few rows used, weight decay 0.01) the per-step losses stay within 0.005 of the dense
    run's; stopping after the step-4 checkpoint and resuming ends with the uninterrupted run's weights."""
    from tuneforge.track import read_metrics

    data = tiny_csv(rows=[("good great fun", "pos"), ("bad awful boring", "neg")] * 30)
    args = ("train.lr=5e-3", "train.max_steps=8", "train.save_steps=4", "train.eval_steps=4",
            "train.warmup_steps=0")
    a = _run(tmp_path, data, *args, name="a")
    d = _run(tmp_path, data, *args, "train.sparse_embeddings=false", name="d")
    losses = [[r["loss"] for r in read_metrics(x.run_dir) if r.get("split") == "train" and "loss" in r] for x in (a, d)]
    assert len(losses[0]) == 8 and max(abs(x - y) for x, y in zip(*losses, strict=True)) < 5e-3
    interrupt_after_checkpoint(lambda: _run(tmp_path, data, *args, name="b"))
    b = train(load_config(tmp_path / "b" / "config.yaml"), resume=True, quiet=True)
    wa = load_file(str(a.run_dir / "model" / "model.safetensors"))
    wb = load_file(str(b.run_dir / "model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.parametrize(("overrides", "match"), [
    (("model=tiny-gpt2", "task=clm"), "tied to the output layer"),
    (("method=lora",), "frozen"),
    (("train.optimizer=adafactor",), "adamw"),
])
def test_refusals_name_the_key(tmp_path: Path, tiny_csv: Callable[..., Path], overrides: tuple[str, ...],
                               match: str) -> None:
    if "task=clm" in overrides:
        data = tmp_path / "text.txt"
        data.write_text("a few words of text to model\n" * 40, encoding="utf-8")
    else:
        data = tiny_csv(n=45)
    with pytest.raises(ConfigError, match=match) as err:
        _run(tmp_path, data, "train.max_steps=1", *overrides)
    assert err.value.key == "train.sparse_embeddings"


def test_norm_without_clipping_and_without_gradients() -> None:
    model, _ = _pair(True)
    assert float(clip_grad_norm(list(model.parameters()), None)) == 0.0  # no gradients yet
    nn.functional.cross_entropy(model(torch.tensor([[1, 2]])), torch.tensor([1])).mul(30).backward()
    before = model.emb.weight.grad.coalesce()._values().clone()
    norm = clip_grad_norm(list(model.parameters()), None)
    dense = torch.cat([p.grad.to_dense().flatten() for p in model.parameters()])
    assert float(norm) == pytest.approx(float(dense.norm()), rel=1e-6)
    assert torch.equal(model.emb.weight.grad._values(), before)  # nothing scaled


# --------------------------------------------------------------------------- exact row gradients


def test_exact_row_gradients_equal_dense_adamw_on_steps_leaving_rows_out() -> None:
    """Each step uses rows the previous one did not (a kept gradient that still held the old rows would
    move them again) with the clip active; every parameter and AdamW moment ends equal to dense AdamW's,
    the rows no step used included (decayed and moved by their momentum as dense AdamW does)."""
    batches = [torch.tensor([[1, 2, 2], [5, 1, 7]]), torch.tensor([[0, 3, 3], [4, 6, 0]]),
               torch.tensor([[8, 9, 1], [10, 2, 8]])]
    (dense, dopt), (rows, ropt) = _pair(False), _pair(True, exact=True)
    start = dense.emb.weight.detach().clone()
    for ids in batches:
        n_dense = _step(dense, dopt, ids, False, scale=30)
        n_rows = _step(rows, ropt, ids, True, scale=30)
        assert n_dense > 0.5 and n_rows == pytest.approx(n_dense, rel=1e-6)  # clipped, by the same factor
    for p, q in zip(dense.parameters(), rows.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ropt.state[rows.emb.weight][key], dopt.state[dense.emb.weight][key],
                                   rtol=0, atol=1e-7)
    assert not torch.equal(rows.emb.weight[1], start[1])  # the rows moved at all
    assert torch.allclose(rows.emb.weight[11], start[11] * (1 - LR * WD) ** 3, atol=1e-7)  # never used: decay only


def _densify_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = DenseRowsAdamW._densify

    def spy(self, p, grad):
        calls.append(int(grad._nnz()))
        return original(self, p, grad)

    monkeypatch.setattr(DenseRowsAdamW, "_densify", spy)
    return calls


def test_run_with_exact_row_gradients_tracks_the_dense_run_and_resumes_bit_for_bit(
        tmp_path: Path, tiny_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny-bert full fine-tuning (the default ``train.embedding_row_grads=true`` applies): per-step losses
    within 1e-5 of ``train.embedding_row_grads=false`` and weights within 1e-5 after 8 steps with clipping;
    an interrupted run resumed from its step-4 checkpoint ends with exactly the uninterrupted weights."""
    from tuneforge.track import read_metrics

    calls = _densify_calls(monkeypatch)
    data = tiny_csv(rows=[("good great fun", "pos"), ("bad awful boring", "neg"), ("fine okay", "pos")] * 20)
    args = ("train.sparse_embeddings=false", "train.lr=5e-3", "train.max_steps=8", "train.save_steps=4",
            "train.eval_steps=4", "train.warmup_steps=0", "train.max_grad_norm=0.5")
    rows = _run(tmp_path, data, *args, name="rows")
    assert len(calls) == 8 and 0 < max(calls) < 200  # one scatter per step, of a few rows of the vocabulary
    dense = _run(tmp_path, data, *args, "train.embedding_row_grads=false", name="dense")
    assert len(calls) == 8
    losses = [[r["loss"] for r in read_metrics(x.run_dir) if r.get("split") == "train" and "loss" in r]
              for x in (rows, dense)]
    assert len(losses[0]) == 8 and max(abs(x - y) for x, y in zip(*losses, strict=True)) < 1e-5
    wr = load_file(str(rows.run_dir / "model" / "model.safetensors"))
    wd = load_file(str(dense.run_dir / "model" / "model.safetensors"))
    assert all(torch.allclose(wr[k], wd[k], atol=1e-5) for k in wr)
    interrupt_after_checkpoint(lambda: _run(tmp_path, data, *args, name="cut"))
    cut = train(load_config(tmp_path / "cut" / "config.yaml"), resume=True, quiet=True)
    wc = load_file(str(cut.run_dir / "model" / "model.safetensors"))
    assert all(torch.equal(wr[k], wc[k]) for k in wr)


@pytest.mark.parametrize("overrides", [("model=tiny-gpt2", "task=clm"), ("method=lora",),
                                       ("train.optimizer=adafactor",)])
def test_exact_row_gradients_stay_off_where_they_do_not_apply(
        tmp_path: Path, tiny_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        overrides: tuple[str, ...]) -> None:
    """A tied LM head, a frozen embedding, another optimizer: the dense gradient, no error (it is a default)."""
    calls = _densify_calls(monkeypatch)
    if "task=clm" in overrides:
        data = tmp_path / "text.txt"
        data.write_text("a few words of text to model\n" * 40, encoding="utf-8")
    else:
        data = tiny_csv(n=45)
    _run(tmp_path, data, "train.sparse_embeddings=false", "train.max_steps=2", *overrides)
    assert calls == []
