"""The shipped decoder-LM recipes validate (config, and data files where the shared data is present) and open
with a comment showing the command that runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["smollm2-sft-lora.yaml", "shakespeare-clm.yaml"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_shows_its_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "recipes" / name
    assert path.read_text(encoding="utf-8").splitlines()[0] == f"# tuneforge train recipes/{name}"
    cfg = load_config(path)
    assert cfg.model.name == "smollm2-135m" and cfg.task.name in ("clm", "sft")
    monkeypatch.chdir(REPO)
    if not cfg.data.train.is_file():
        pytest.skip(f"{cfg.data.train} is not here (shared data is only on the team machine)")
    from tuneforge.objectives import get_objective

    # every data check (the model check is skipped: it converts SmolLM2 on first use; see test_smollm2.py)
    objective = get_objective(cfg)
    monkeypatch.setattr("tuneforge.objectives.clm.check_decoder", lambda run: None)
    monkeypatch.setattr("tuneforge.objectives.sft.check_decoder", lambda run: None)
    data = objective.load_data(cfg)
    assert len(data.splits["validation"]) == {"sft": 100, "clm": 200}[cfg.task.name]
