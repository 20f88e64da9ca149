"""Fixtures of the distributed tests: one work folder (data, a dropout-free tiny BERT) and the one-process
reference run that the DDP and FSDP runs are compared with. Imported by the test modules that use them (not a
``conftest.py``: a second module named ``conftest`` would shadow ``tests/conftest.py``, whose helpers other
tests import as ``from conftest import make_rows``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _dist import ARGS, classification_data, no_dropout_model, train

__all__ = ["one_process", "workdir"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("distributed")
    classification_data(d)
    no_dropout_model("tiny-bert", d / "bert")
    return d


@pytest.fixture(scope="session")
def one_process(workdir: Path) -> Path:
    """1 process x batch 8, 16 steps: what 2 ranks x batch 4 must reproduce."""
    train(workdir, 1, *ARGS, "output_dir=one", "train.batch_size=8", flags=("--quiet",))
    return workdir / "one"
