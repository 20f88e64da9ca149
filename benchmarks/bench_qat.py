"""Benchmark: a QAT run's converted (int8-activation / intN-weight) model against its fp32 weights on this CPU.

Loads a finished ``method=qat`` classification run twice: the fp32 master weights as the plain transformers
folder they are saved as, and the converted model as tuneforge loads it (``load_trained``: torchao
``quantize_`` of those weights, exactly QAT's convert). Reports the serialised size of each (``torch.save``
of the state dict), the median latency of a forward pass at batch 1 and batch 32 over SST-2 dev sentences
(dynamic padding, ``inference_mode``, fp32, after warm-up), and the accuracy of both on the dev file.
Optionally an fp32 fine-tuning run (``--fp32-run``) is scored the same way for the accuracy comparison.

    python benchmarks/bench_qat.py RUN_DIR --dev ../shared/data/sst2/dev.tsv [--fp32-run RUN] [--threads 2] [--no-accuracy]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import time
from pathlib import Path

import torch


def _size(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _latency(model, tok, texts: list[str], batch: int, repeats: int) -> float:
    """Median seconds per forward pass over ``repeats`` batches of ``batch`` sentences (2 warm-up passes)."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            rows = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
            enc = tok(rows, padding=True, truncation=True, max_length=128, return_tensors="pt")
            t = time.perf_counter()
            model(**enc)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def _accuracy(model, tok, texts: list[str], labels: list[int]) -> float:
    right = 0
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            right += int((model(**enc).logits.argmax(-1) == torch.tensor(labels[i:i + 64])).sum())
    return right / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--dev", type=Path, required=True)
    ap.add_argument("--fp32-run", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-accuracy", action="store_true", help="sizes and latency only (accuracy is in metrics.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.methods.saved import load_trained

    with args.dev.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    folder = args.run / "model"
    names = json.loads((folder / "labels.json").read_text())["labels"]
    texts, labels = [r["sentence"] for r in rows], [names.index(r["label"]) for r in rows]
    tok = AutoTokenizer.from_pretrained(folder)
    models = {"fp32 (QAT master weights)": AutoModelForSequenceClassification.from_pretrained(folder).eval(),
              "converted (QAT)": load_trained(AutoModelForSequenceClassification, folder).eval()}
    if args.fp32_run is not None:
        models["fp32 fine-tuning run"] = AutoModelForSequenceClassification.from_pretrained(args.fp32_run / "model").eval()
    out = {"threads": args.threads, "dev_rows": len(texts)}
    for name, m in models.items():
        out[name] = {"bytes": _size(m), "accuracy": None if args.no_accuracy else _accuracy(m, tok, texts, labels),
                     "latency_ms_b1": 1e3 * _latency(m, tok, texts, 1, args.repeats),
                     "latency_ms_b32": 1e3 * _latency(m, tok, texts, 32, max(5, args.repeats // 4))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
