"""The alignment recipes validate as `tuneforge validate` checks them: config, model, files, skipped rows and splits
(skipped where the shared data is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.inference import validate_run

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "preference"


@pytest.mark.parametrize(("recipe", "needs", "expect"), [
    ("reward-minilm.yaml", SHARED / "hh_rlhf_train.jsonl.gz",
     ["config ok: task=reward method=full model=minilm-l6", "train=4836, validation=500", "skipped 34 chosen == rejected, 16 malformed"]),
    ("dpo-smollm2-lora.yaml", SHARED / "dpo_en_demo.json",
     ["config ok: task=dpo method=lora model=smollm2-135m", "train=120, validation=30"]),
])
def test_alignment_recipe_validates(recipe: str, needs: Path, expect: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if not needs.is_file():
        pytest.skip(f"shared data not found: {needs}")
    monkeypatch.chdir(REPO)  # recipes name ../shared/... relative to the checkout
    run = load_config(REPO / "recipes" / recipe)
    assert (REPO / "recipes" / recipe).read_text().startswith(f"# tuneforge train recipes/{recipe}")
    summary = validate_run(run)
    for text in expect:
        assert text in summary, summary
