"""The forgetting report's ``general_recipe``: a classifier's general ability measured by another objective on
its backbone (here the STS Spearman of mean-pooled sentence embeddings, the MLM-free proxy of the MiniLM
forgetting table), against a direct computation with transformers and scipy; the forgetting table reads the
general metric it names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.models.registry import resolve_model
from tuneforge.pipeline import train

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "book", "day", "song"]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("proxy")
    with (d / "train.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(32):
            w.writerow([" ".join(WORDS[(i * k + 3) % 10] for k in range(1, 3 + i % 4)), "pos" if i % 2 else "neg"])
    pairs = []
    for i in range(24):  # STS-like rows: score, sentence, sentence
        a = " ".join(WORDS[(i + k) % 10] for k in range(4))
        b = " ".join(WORDS[(i + k * (1 + i % 3)) % 10] for k in range(4))
        pairs.append((f"{(i * 7) % 6:.1f}", a, b))
    with (d / "sts.tsv").open("w", encoding="utf-8") as f:
        f.writelines(f"{s}\t{a}\t{b}\n" for s, a, b in pairs)
    (d / "sts.yaml").write_text(
        "model: tiny-bert\ntask: {name: contrastive, loss: cosent, pooling: mean, score_range: [0, 5]}\n"
        f"data: {{train: {d / 'sts.tsv'}, validation: {d / 'sts.tsv'}, format: tsv, header: false, quoting: false, "
        "text_column: 1, text_pair_column: 2, label_column: 0, max_length: 32}\n", encoding="utf-8")
    return {"train": d / "train.csv", "sts": d / "sts.tsv", "recipe": d / "sts.yaml", "pairs": pairs}


def _args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["model=tiny-bert", f"data.train={files['train']}", f"data.validation={files['train']}",
            "train.batch_size=8", "train.max_steps=6", "train.lr=1e-2", "train.warmup_steps=0",
            "train.precision=fp32", "train.tensorboard=false", "train.seed=0", f"output_dir={out}",
            f"extensions=[{{name: forgetting, general_recipe: {files['recipe']}}}]", *extra]


def _sts_spearman(model: torch.nn.Module, pairs: list[tuple[str, str, str]]) -> float:
    """Mean-pooled last hidden states, cosine per pair, Spearman x 100 against the scores (scipy)."""
    from scipy.stats import spearmanr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-bert"))

    def embed(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model.eval()(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    cos = torch.nn.functional.cosine_similarity(embed([p[1] for p in pairs]), embed([p[2] for p in pairs]))
    return float(spearmanr(cos.numpy(), [float(p[0]) for p in pairs]).statistic) * 100


def test_general_recipe_scores_the_backbone_with_the_sts_objective(files: dict, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    from tuneforge.forgetting_table import VariantResult, _fill

    run_dir = train(load_config(None, _args(files, tmp_path / "run")), quiet=True).run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    block = metrics["forgetting"]
    assert block["general_task"] == "contrastive" and block["general_metric"] == "spearman"
    assert "accuracy" in block["domain"] and "accuracy" not in block["general"]
    before = _sts_spearman(AutoModel.from_pretrained(resolve_model("tiny-bert")), files["pairs"])
    trained = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    after = _sts_spearman(trained.bert, files["pairs"])
    assert block["general"]["spearman"]["before"] == pytest.approx(before, abs=1e-3)
    assert block["general"]["spearman"]["after"] == pytest.approx(after, abs=1e-3)
    assert abs(after - before) > 1e-3  # training moved the backbone
    assert "scored by the 'contrastive' objective on the backbone" in (run_dir / "report.md").read_text()

    row = VariantResult("none")
    _fill(row, metrics, "accuracy")
    assert row.general_metric == "spearman" and row.general_before == block["general"]["spearman"]["before"]
    assert row.domain_after == block["domain"]["accuracy"]["after"]


def test_missing_general_recipe_names_the_key(files: dict, tmp_path: Path) -> None:
    args = [a for a in _args(files, tmp_path / "x") if not a.startswith("extensions=")]
    with pytest.raises(ConfigError, match="file not found") as err:
        train(load_config(None, [*args, "extensions=[{name: forgetting, general_recipe: nowhere.yaml}]"]), quiet=True)
    assert err.value.key == "extensions.forgetting.general_recipe"
