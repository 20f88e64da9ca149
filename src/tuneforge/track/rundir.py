"""Where the model of a run-like folder lives, for everything that reads one (eval, predict, generate, serve,
embed, compare, export, a distillation teacher).

Two layouts are run-like: a training run keeps its model in ``RUN/model/`` beside ``config.yaml``,
metrics and checkpoints; a folder written by ``tuneforge merge RUN OUT`` *is* the model folder (the
Hugging Face files at its top, so ``from_pretrained(OUT)`` loads it) with tuneforge's ``config.yaml`` and
``merge.json`` beside them. Merged folders written before that change (``OUT/model/``) still read.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_run_dir", "model_folder"]


def model_folder(run_dir: str | Path) -> Path:
    """``run_dir/model`` when there is one (or nothing else to pick), else ``run_dir`` when it holds a model
    (its ``config.json``) itself."""
    run_dir = Path(run_dir)
    nested = run_dir / "model"
    if not nested.is_dir() and (run_dir / "config.json").is_file():
        return run_dir
    return nested


def is_run_dir(path: str | Path) -> bool:
    """A finished tuneforge run or merged folder: its recipe (``config.yaml``) and a model folder."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (model_folder(path) / "config.json").is_file()
