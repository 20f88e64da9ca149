"""Contrastive sentence embeddings: losses against their formulas, every data shape trains on tiny-bert, the
saved run re-evaluates to its final metrics, and sentence-transformers loads the folder and gives the vectors
`tuneforge embed` writes."""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.inference import evaluate_file
from tuneforge.objectives.contrastive import cosent_loss, mnrl_loss, pool
from tuneforge.pipeline import train


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


# ------------------------------------------------------------------------------------------- formulas
def test_mnrl_is_cross_entropy_of_scaled_cosines() -> None:
    torch.manual_seed(0)
    a, p = torch.randn(6, 8), torch.randn(6, 8)
    cos = F.cosine_similarity(a[:, None], p[None, :], dim=-1)
    assert float(mnrl_loss(a, p, 20.0)) == pytest.approx(float(F.cross_entropy(20 * cos, torch.arange(6))), rel=1e-5)
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[0, 3] = True  # candidate 3 duplicates row 0's positive: out of row 0's softmax
    logits = (20 * cos).masked_fill(same, float("-inf"))
    assert float(mnrl_loss(a, p, 20.0, same)) == pytest.approx(float(F.cross_entropy(logits, torch.arange(6))), rel=1e-5)


def test_cosent_matches_the_pairwise_formula() -> None:
    torch.manual_seed(1)
    cos, gold = torch.rand(5) * 2 - 1, torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3])
    terms = [torch.exp(20 * (cos[j] - cos[i])) for i, j in itertools.permutations(range(5), 2) if gold[i] > gold[j]]
    expected = torch.log(1 + torch.stack(terms).sum())
    assert float(cosent_loss(cos, gold, 20.0)) == pytest.approx(float(expected), rel=1e-5)


def test_mean_pooling_ignores_padding() -> None:
    h = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert pool(h, torch.tensor([[1, 1, 0]]), "mean").tolist() == [[2.0, 2.0]]
    assert pool(h, torch.tensor([[1, 1, 0]]), "cls").tolist() == [[1.0, 1.0]]


# ------------------------------------------------------------------------------------------- runs
TOPICS = {"sport": ["football", "tennis", "match", "goal"], "food": ["pizza", "bread", "cheese", "soup"],
          "music": ["guitar", "song", "piano", "band"]}


def _sentence(rng: random.Random, topic: str) -> str:
    return " ".join(rng.choice(TOPICS[topic]) for _ in range(4))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("contrastive")
    rng = random.Random(0)
    names = list(TOPICS)

    def write(name: str, rows: list[list], header: list[str]) -> Path:
        with (d / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        return d / name

    scored = []
    for _ in range(80):
        t1, t2 = rng.choice(names), rng.choice(names)
        scored.append([_sentence(rng, t1), _sentence(rng, t2), 5.0 if t1 == t2 else 0.0])
    pairs = [[_sentence(rng, t), _sentence(rng, t)] for t in (rng.choice(names) for _ in range(60))]
    triplets = [[a, b, _sentence(rng, next(n for n in names if n not in a))] for a, b in pairs]
    return {
        "scored_train": write("scored-train.csv", scored[:60], ["s1", "s2", "score"]),
        "scored_val": write("scored-val.csv", scored[60:], ["s1", "s2", "score"]),
        "pairs_train": write("pairs-train.csv", pairs[:48], ["s1", "s2"]),
        "pairs_val": write("pairs-val.csv", pairs[48:], ["s1", "s2"]),
        "triplets": write("triplets.csv", triplets, ["s1", "s2", "neg"]),
        "text": write("text.csv", [[p[0]] for p in pairs], ["s1"]),
    }


def _args(out: Path, *extra: str) -> list[str]:
    return ["model=tiny-bert", "task=contrastive", "data.text_column=s1", "data.text_pair_column=s2",
            "data.label_column=score", "train.batch_size=8", "train.max_steps=12", "train.lr=5e-3",
            "train.warmup_steps=0", "train.precision=fp32", "train.tensorboard=false", "train.seed=0",
            "train.eval_on_start=true", f"output_dir={out}", *extra]


def test_scored_pairs_learn_and_the_saved_run_reevaluates(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sts"
    res = train(load_config(None, _args(out, f"data.train={files['scored_train']}",
                                        f"data.validation={files['scored_val']}")), quiet=True)
    history = json.loads((out / "checkpoints" / next(p.name for p in (out / "checkpoints").iterdir()
                                                      if p.name.startswith("step-")) / "state.json")
                         .read_text(encoding="utf-8"))["eval_history"]
    before, final = history[0]["spearman"], res.metrics["splits"]["validation"]
    assert final["spearman"] > before + 5  # the topic structure is learnable: spearman rises
    flat = evaluate_file(out, files["scored_val"], [])
    assert flat["spearman"] == pytest.approx(final["spearman"], abs=1e-4)
    assert set(flat) >= {"spearman", "pearson", "loss"}


@pytest.mark.parametrize("shape", ["pairs", "triplets", "unsupervised"])
def test_other_shapes_train(shape: str, files: dict[str, Path], tmp_path: Path) -> None:
    extra = {"pairs": [f"data.train={files['pairs_train']}", f"data.validation={files['pairs_val']}"],
             "triplets": [f"data.train={files['triplets']}", "task.negative_column=neg"],
             "unsupervised": [f"data.train={files['text']}", "data.text_pair_column=null"]}[shape]
    res = train(load_config(None, _args(tmp_path / shape, *extra)), quiet=True)
    metrics = res.metrics["splits"]["validation"]
    if shape == "unsupervised":
        assert metrics["loss"] > 0
    else:
        assert 0 <= metrics["recall@1"] <= metrics["recall@10"] <= 1


def test_sentence_transformers_loads_the_run_and_embed_matches(files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from tuneforge.embedding import embed_file

    out = tmp_path / "run"
    train(load_config(None, _args(out, f"data.train={files['scored_train']}", f"data.validation={files['scored_val']}",
                                  "train.max_steps=4")), quiet=True)
    texts = tmp_path / "texts.txt"
    sentences = ["football match goal", "pizza and cheese", "a song on the piano"]
    texts.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    assert embed_file(out, texts, tmp_path / "v.npy", []) == 3
    ours = np.load(tmp_path / "v.npy")
    theirs = SentenceTransformer(str(out / "model"), device="cpu").encode(sentences, convert_to_numpy=True)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-4
    embed_file(out, texts, tmp_path / "v.jsonl", [])
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == sentences and np.allclose(rows[1]["embedding"], ours[1], atol=1e-6)


def test_lora_applies_and_virtual_tokens_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    res = train(load_config(None, _args(tmp_path / "lora", f"data.train={files['scored_train']}",
                                        f"data.validation={files['scored_val']}", "method=lora",
                                        "train.max_steps=2")), quiet=True)
    assert res.metrics["train"]["trainable_params"] < res.metrics["train"]["total_params"] / 10
    with pytest.raises(ConfigError, match="adds virtual tokens"):
        load_config(None, _args(tmp_path / "x", f"data.train={files['scored_train']}", "method=prompt"))
