"""The NER, QA and multi-task recipes validate as `tuneforge validate` checks them: config, model, files, columns and
labels (skipped where the shared data or the bundled MiniLM is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.inference import validate_run

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


@pytest.mark.parametrize(("recipe", "needs", "expect"), [
    ("conll-ner-minilm.yaml", SHARED / "conll2003" / "eng.train", "task=token_classification"),
    ("squad-qa-minilm.yaml", SHARED / "qa" / "xquad.en.json", "task=extractive_qa"),
    ("multitask-minilm.yaml", SHARED / "sst2" / "train.tsv", "task=multitask"),
    ("sts-minilm-contrastive.yaml", SHARED / "sts" / "sts-train.csv", "task=contrastive"),
])
def test_task_recipe_validates(recipe: str, needs: Path, expect: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not needs.is_file():
        pytest.skip(f"shared data not found: {needs}")
    monkeypatch.chdir(REPO)  # recipes name ../shared/... relative to the checkout
    run = load_config(REPO / "recipes" / recipe)
    summary = validate_run(run)
    assert summary.startswith(f"config ok: {expect} method=full model=minilm-l6"), summary
    assert "data ok: train=" in summary and "validation=" in summary
    if expect == "task=multitask":  # each task's data read and counted
        assert "train=4000 (sst2) + 4000 (ner)" in summary
