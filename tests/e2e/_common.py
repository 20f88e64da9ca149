"""What the CLI tests share: sentiment rows, CSV writing and the environment of a `tuneforge` subprocess."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "tuneforge"

POSITIVE = ["i love this {}", "what a great {}", "the {} was wonderful", "best {} ever", "a really good {}"]
NEGATIVE = ["i hate this {}", "what a terrible {}", "the {} was awful", "worst {} ever", "a really bad {}"]
NEUTRAL = ["this is a {}", "the {} is on the table", "i saw a {} today", "there is a {}", "a {} exists"]
THINGS = ["movie", "book", "meal", "song", "phone", "car"]


def sentiment_rows(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """``n`` labelled sentences (positive / negative / neutral cycling), starting at row ``offset``."""
    rows = []
    for i in range(offset, offset + n):
        label = ("positive", "negative", "neutral")[i % 3]
        templates = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
        rows.append((templates[(i // 3) % len(templates)].format(THINGS[(i // 15) % len(THINGS)]), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label"), delimiter: str = ",") -> Path:
    """``rows`` under ``header`` (None: no header line)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def cli_env() -> dict[str, str]:
    """The environment of a `tuneforge` subprocess: the persistent test cache, offline, one thread."""
    env = dict(os.environ)
    env.update(
        TUNEFORGE_CACHE=str(CACHE),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # tiny models gain nothing from intra-op threads; on a shared 2-core machine they only contend
        OMP_NUM_THREADS=os.environ.get("TUNEFORGE_TEST_THREADS", "1"),
    )
    env.pop("TUNEFORGE_DEBUG", None)
    return env


def cli(*args: str, cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m tuneforge ARGS`` as a user would; with ``check``, a non-zero exit fails the test."""
    proc = subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"tuneforge {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc
