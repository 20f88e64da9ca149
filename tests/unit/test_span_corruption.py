"""T5 span corruption: exact reconstruction from input + target, measured noise density and span length,
sentinel order and count, fixed shapes, the sentinel-shortage error, and a short tiny-t5 run."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.models import resolve_model
from tuneforge.objectives.span_corruption import (
    SpanCorruptionObjective,
    corrupt,
    random_spans_noise_mask,
    span_counts,
)
from tuneforge.pipeline import train

CORPUS = Path(__file__).resolve().parents[2] / "src" / "tuneforge" / "assets" / "tiny_corpus.txt"
SENTINELS = np.arange(1000, 1200)  # stand-in sentinel ids, outside the token range below
EOS = 1


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Undo `corrupt`: put each target span back in place of its sentinel."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    is_sentinel = np.isin(targets[:-1], sentinels)
    bounds = np.flatnonzero(is_sentinel)
    spans = {int(targets[b]): targets[b + 1 : e] for b, e in itertools.pairwise(bounds)}
    out: list[int] = []
    for t in inputs[:-1]:
        out.extend(spans[int(t)] if t in spans else [t])
    return np.array(out)


def test_reconstruction_is_exact_for_many_seeds_and_lengths() -> None:
    rng = np.random.default_rng(0)
    for trial in range(400):
        length = int(rng.integers(2, 400))
        tokens = rng.integers(2, 1000, size=length)
        noise = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(trial))
        inputs, targets = corrupt(tokens, noise, SENTINELS, EOS)
        np.testing.assert_array_equal(reconstruct(inputs, targets, SENTINELS), tokens)
        n_noise, n_spans = span_counts(length, 0.15, 3.0)
        assert noise.sum() == n_noise and not noise[0]  # T5's masks start with non-noise
        used = targets[np.isin(targets, SENTINELS)]
        np.testing.assert_array_equal(used, SENTINELS[: n_spans + 1])  # in order, plus the final one
        np.testing.assert_array_equal(inputs[np.isin(inputs, SENTINELS)], SENTINELS[:n_spans])
        assert len(inputs) == length - n_noise + n_spans + 1 and len(targets) == n_noise + n_spans + 2


def test_measured_noise_density_and_mean_span_length() -> None:
    noise_tokens = total = spans = 0
    rng = np.random.default_rng(1)
    for seed in range(2000):
        length = int(rng.integers(64, 600))
        mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
        noise_tokens += int(mask.sum())
        total += length
        spans += int((mask & ~np.pad(mask, [1, 0])[:-1]).sum())
    assert abs(noise_tokens / total - 0.15) < 0.01
    assert abs(noise_tokens / spans - 3.0) < 0.1


def test_span_lengths_vary_and_positions_are_random() -> None:
    masks = np.stack([random_spans_noise_mask(128, 0.15, 3.0, np.random.default_rng(s)) for s in range(500)])
    # T5's layout (no random roll): spans alternate non-noise / noise, starting with non-noise, ending with noise
    assert not masks[:, 0].any() and masks[:, -1].all()
    interior = masks[:, 10:-10].mean(0)  # away from the ends, every position is about as likely to be noise
    assert interior.min() > 0.08 and interior.max() < 0.22
    lengths = np.concatenate([np.diff(np.flatnonzero(np.diff(np.r_[0, m.astype(int), 0])))[::2] for m in masks])
    assert lengths.min() == 1 and lengths.max() >= 8  # random segmentation, not fixed-length spans


def test_batches_have_fixed_shapes_and_use_the_global_rng() -> None:
    path = resolve_model("tiny-t5")
    tok = AutoTokenizer.from_pretrained(path)
    obj = SpanCorruptionObjective(load_config(None, ["task=span_corruption", "model=tiny-t5", "data.max_length=128"]))
    apply = obj.transform(tok)
    blocks = np.random.default_rng(0).integers(3, 1000, size=(6, 128))
    torch.manual_seed(3)
    a = apply(blocks, None)
    torch.manual_seed(3)
    b = apply(blocks, None)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert tuple(a["input_ids"].shape) == (6, 128 - 19 + 6 + 1) and tuple(a["labels"].shape) == (6, 19 + 6 + 2)
    sentinels = np.array(tok.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(7)]))
    for i in range(6):
        np.testing.assert_array_equal(
            reconstruct(a["input_ids"][i].numpy(), a["labels"][i].numpy(), sentinels), blocks[i])


def test_too_few_sentinels_is_a_config_error() -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-t5"))  # 20 sentinels
    obj = SpanCorruptionObjective(load_config(None, ["task=span_corruption", "model=tiny-t5", "data.max_length=512"]))
    with pytest.raises(ConfigError) as info:
        obj.transform(tok)
    assert info.value.key == "data.max_length"
    assert "has 20 sentinel tokens" in str(info.value) and "needs 27 (26 spans + 1 final)" in str(info.value)


def test_non_t5_model_is_refused_before_loading() -> None:
    run = load_config(None, ["task=span_corruption", "model=tiny-bert", f"data.train={CORPUS}"])
    with pytest.raises(ConfigError, match="'tiny-bert' is 'bert'"):
        SpanCorruptionObjective(run).load_data(run)


def test_short_tiny_t5_run_learns_and_saves_plain_folder(tmp_path: Path) -> None:
    run = load_config(None, [
        "task=span_corruption", "model=tiny-t5", f"data.train={CORPUS}", "data.max_length=64",
        "train.batch_size=16", "train.max_steps=16", "train.lr=3e-3", "train.warmup_steps=0", "train.precision=fp32",
        "train.eval_steps=8", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}",
    ])
    res = train(run, quiet=True)
    val = res.metrics["splits"]["validation"]
    assert val["perplexity"] == pytest.approx(np.exp(val["loss"]))
    assert val["target_tokens"] % (10 + 3 + 2) == 0  # every target of a 64-token block: 10 noise, 3 spans
    from tuneforge.track import read_metrics

    evals = [r["loss"] for r in read_metrics(tmp_path / "run") if r.get("split") == "eval"]
    assert evals[-1] < evals[0]
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path / "run" / "model"))
