"""``train.fast_dropout``: the dropout it computes is torch's in distribution (`engine.fast_dropout`).

Bounded against the definition (inverted dropout): every output is 0 or x / (1 - p); the kept share is 1 - p
within sampling error (rounded to 2^-16); the gradient is the same mask; a seed fixes the mask; eval mode and
p = 0 are the identity; the loop swaps the modules only when asked and only on CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tuneforge.engine.fast_dropout import FastDropout, drop_positions, fast_dropout, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_values_and_kept_share(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5
    y = fast_dropout(x, p)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
    share = kept.float().mean().item()
    # 1e6 draws: the standard error of the share is below 5e-4; the rounding of 1 - p to 2^-16 below 8e-6
    assert abs(share - (1 - p)) < 2.5e-3
    assert abs(y.mean().item() / x.mean().item() - 1) < 5e-3  # the mean is kept (inverted dropout)


def test_bf16_input_and_odd_sizes() -> None:
    torch.manual_seed(1)
    x = torch.ones(7, 13, dtype=torch.bfloat16)  # 91 elements: not a multiple of the four draws per int64
    y = fast_dropout(x, 0.2)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert set(torch.unique(y.float()).tolist()) <= {0.0, float(torch.tensor(1 / 0.8, dtype=torch.bfloat16))}


def test_gradient_is_the_mask_and_seed_fixes_it() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(3)
    y = fast_dropout(x, 0.3)
    y.sum().backward()
    mask = (y != 0).float() / 0.7
    assert torch.allclose(x.grad, mask)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x.detach(), 0.3), y.detach())
    assert not torch.equal(fast_dropout(x.detach(), 0.3), y.detach())  # the stream moves on


def test_module_is_identity_in_eval_and_swapped_in_place() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25), nn.Sequential(nn.Dropout(0.1)), nn.Dropout(0.0))
    assert use_fast_dropout(model) == 3
    assert all(type(m) is FastDropout for m in model.modules() if isinstance(m, nn.Dropout))
    assert model[1].p == 0.25 and model[2][0].p == 0.1
    x = torch.randn(8, 4)
    model.eval()
    assert torch.equal(model[1](x), x)
    model.train()
    assert torch.equal(model[3](x), x)  # p = 0
    torch.manual_seed(0)
    out = model[1](x)
    assert ((out == 0) | torch.isclose(out, x / 0.75)).all()


@pytest.mark.parametrize("flag", [True, False])
def test_the_loop_swaps_only_when_asked(flag: bool, tmp_path, tiny_csv) -> None:
    from tuneforge.config import load_config
    from tuneforge.engine import loops

    seen: list[int] = []
    init = loops.LoopBase.__init__

    def spy(self, ctx):  # count the plain nn.Dropout modules left after the loop is set up
        init(self, ctx)
        seen.append(sum(type(m) is nn.Dropout for m in self.module.modules()))

    loops.LoopBase.__init__ = spy
    try:
        from tuneforge.pipeline import train

        train(load_config(None, ["model=tiny-bert", f"data.train={tiny_csv(n=45)}", "train.max_steps=1",
                                 f"train.fast_dropout={str(flag).lower()}", "train.tensorboard=false",
                                 f"output_dir={tmp_path / 'run'}"]), overwrite=True, quiet=True)
    finally:
        loops.LoopBase.__init__ = init
    assert (seen[0] == 0) if flag else (seen[0] > 0)


@pytest.mark.parametrize("p", [0.05, 0.15, 0.6])
def test_drop_positions_is_an_independent_bernoulli_draw_per_element(p: float) -> None:
    """`drop_positions` (geometric gaps) against the definition: each element dropped with probability p,
    independently: the share, the gaps' distribution P(gap = k) = (1 - p)^(k-1) p, an even spread."""
    n = 1_000_000
    torch.manual_seed(0)
    idx = drop_positions(n, p)
    assert idx.dtype == torch.int64 and bool((idx.diff() > 0).all()) and int(idx[0]) >= 0 and int(idx[-1]) < n
    # share: the standard error of n p draws is sqrt(p (1 - p) / n) <= 5e-4
    assert abs(idx.numel() / n - p) < 2.5e-3
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    for k in (1, 2, 3, 10):
        expected = (1 - p) ** (k - 1) * p
        seen = float((gaps == k).float().mean())
        assert abs(seen - expected) < 5 * (expected * (1 - expected) / gaps.numel()) ** 0.5 + 1e-4, (k, seen, expected)
    tenths = torch.bincount(idx * 10 // n, minlength=10).double() / (n / 10)
    assert float((tenths - p).abs().max()) < 5 * (p * (1 - p) / (n / 10)) ** 0.5


def test_drop_positions_seeded_and_independent_of_the_block_size() -> None:
    torch.manual_seed(4)
    first = drop_positions(50_000, 0.1)
    torch.manual_seed(4)
    assert torch.equal(drop_positions(50_000, 0.1, block=7), first)  # many blocks of 7 uniforms: the same stream
    torch.manual_seed(5)
    assert not torch.equal(drop_positions(50_000, 0.1), first)
    assert drop_positions(0, 0.1).numel() == 0
    with pytest.raises(ValueError, match="0 < p < 1"):
        drop_positions(10, 0.0)
