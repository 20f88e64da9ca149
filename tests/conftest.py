"""Shared test setup: an offline, persistent tuneforge cache and small data factories.

The cache (tiny models, tokenized data) lives in ``<repo>/.cache/tuneforge`` (git-ignored) so the tiny
models are built once per machine, not once per test session. ``setdefault`` keeps any cache the caller
chose (``TUNEFORGE_CACHE=... pytest``); fixtures of individual test modules may still point it elsewhere
for their own scope with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Set at import time too, so modules imported during collection (e.g. transformers reading
# TRANSFORMERS_VERBOSITY once) already see them.
os.environ.setdefault("TUNEFORGE_CACHE", str(REPO_ROOT / ".cache" / "tuneforge"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: the runs the tests start as subprocesses (the
    # CLI, torchrun ranks) take one thread each too, or they spin against the other worker (an SST-2 CLI
    # run: 27 s alone with 2 threads, 84 s with 2 threads beside the other worker, 33 s with 1).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def tuneforge_env() -> Iterator[Path]:
    """Persistent tuneforge cache, hub access off, quiet transformers; yields the cache root."""
    os.environ.setdefault("TUNEFORGE_CACHE", str(REPO_ROOT / ".cache" / "tuneforge"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:  # transformers reads the variable once at import; apply it if it was imported already
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported by the tests that need it
        pass
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
    # spin against other processes (a tiny-bert step goes from ~20 ms to ~200 ms).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TUNEFORGE_TEST_THREADS", "1")))
    root = Path(os.environ["TUNEFORGE_CACHE"])
    root.mkdir(parents=True, exist_ok=True)
    yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (only present on the team machine)")
    return SHARED_DATA


_TEMPLATES = {
    "positive": ["a great {} and fun", "i loved the {} so much", "the {} was wonderful", "what a good {}"],
    "negative": ["a terrible {} and boring", "i hated the {} a lot", "the {} was awful", "what a bad {}"],
    "neutral": ["a {} from last year", "i saw the {} on monday", "the {} was on tv", "there is a {}"],
}
_NOUNS = ["movie", "film", "show", "book", "song"]


def make_rows(n: int, labels: tuple[str, ...] = ("positive", "negative", "neutral")) -> list[tuple[str, str]]:
    """``n`` short labelled sentences, classes cycling in order (so every class has ~n/k rows)."""
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        templates = _TEMPLATES[label]
        text = templates[(i // len(labels)) % len(templates)].format(_NOUNS[(i // 7) % len(_NOUNS)])
        rows.append((text, label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture()
def tiny_csv(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_csv(n=60, labels=(...), name="train.csv", rows=None)`` writes a text,label CSV.

    Rows come from templates (positive / negative / neutral sentences) unless ``rows`` is given.
    """

    def make(
        n: int = 60,
        labels: tuple[str, ...] = ("positive", "negative", "neutral"),
        name: str = "train.csv",
        rows: list[tuple[str, str]] | None = None,
    ) -> Path:
        return write_csv(tmp_path / name, rows if rows is not None else make_rows(n, labels))

    return make


def interrupt_after_checkpoint(start: Callable[[], object], step: int | None = None) -> None:
    """Run ``start()`` (a training call) and stop it with KeyboardInterrupt right after it writes its first
    checkpoint (or the one of optimizer step ``step``): the state a crash mid-run leaves, for resume tests."""
    import tuneforge.engine.loops as loops

    real = loops.save_checkpoint

    def stop(*args: object, **kwargs: object) -> Path:
        path = real(*args, **kwargs)
        if step is None or path.name == f"step-{step:08d}":
            raise KeyboardInterrupt
        return path

    loops.save_checkpoint = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            start()
    finally:
        loops.save_checkpoint = real
