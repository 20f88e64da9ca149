"""What the UI tests share: a runs folder made by tiny training runs, plus the files that `tuneforge compare`
and `tuneforge forgetting-table` write (by their own writers, without their training)."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.pipeline import train

_WORDS = {"positive": "great good wonderful", "negative": "awful bad terrible", "neutral": "a the some"}


def write_csv(path: Path, n: int) -> Path:
    """``n`` rows of text,label (three classes cycling), so every class is there."""
    labels = list(_WORDS)
    rows = [f"{_WORDS[labels[i % 3]].split()[i // 3 % 3]} movie {i},{labels[i % 3]}" for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def chat_data(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("cat", "dog", "sun", "park", "mat", "rain") * 4]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_runs(root: Path) -> dict[str, Path]:
    """``root/data`` (inputs) and ``root/runs`` with: ``bert`` (tiny-bert classification, full), ``llama``
    (tiny-llama SFT, LoRA, with before/after samples), ``compare-demo`` and ``forgetting-demo`` tables."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_csv = write_csv(data / "train.csv", 48)
    val_csv = write_csv(data / "val.csv", 15)
    chat = chat_data(data / "chat.jsonl")
    runs = root / "runs"
    common = ["train.precision=fp32", "train.tensorboard=false", "train.batch_size=8"]
    train(load_config(None, ["model=tiny-bert", f"data.train={train_csv}", f"data.validation={val_csv}",
                             "train.max_steps=8", "train.eval_steps=4", "train.log_steps=2", "train.lr=1e-3",
                             f"output_dir={runs / 'bert'}", *common]), quiet=True)
    train(load_config(None, ["model=tiny-llama", "task=sft", "task.template=chatml", "method=lora",
                             f"data.train={chat}", "data.max_length=64", "train.max_steps=4", "train.log_steps=1",
                             f"output_dir={runs / 'llama'}", *common]), quiet=True)
    _tables(runs)
    return {"root": root, "runs": runs, "train": train_csv, "val": val_csv, "chat": chat}


def _tables(runs: Path) -> None:
    from tuneforge import compare, forgetting_table

    out = runs / "compare-demo"
    out.mkdir(parents=True)
    rows = [compare.MethodResult("full", lr=5e-5, trainable_params=1000, total_params=1000, trainable_pct=100.0,
                                 metric=0.61, train_samples_per_s=120.0, saved_bytes=4000, base_latency_ms=1.0,
                                 latency_ms=1.0, merged_note="n/a (plain weights)"),
            compare.MethodResult("lora", lr=1e-3, trainable_params=50, total_params=1050, trainable_pct=4.76,
                                 metric=0.58, train_samples_per_s=150.0, saved_bytes=400, base_latency_ms=1.0,
                                 latency_ms=1.2, merged_latency_ms=1.0)]
    compare._write_outputs(out, rows, "accuracy", load_config(None, ["model=tiny-bert", "train.max_steps=8"]),
                           "tuneforge compare methods=full,lora", 3)
    out = runs / "forgetting-demo"
    out.mkdir(parents=True)
    forgetting_table._write(out, [
        forgetting_table.VariantResult("none", 0.9, 0.7, 0.5, -0.2, 0.3, 10.0),
        forgetting_table.VariantResult("l2sp", 0.88, 0.7, 0.66, -0.04, 0.05, 11.0)], "accuracy", "tuneforge forgetting-table")
