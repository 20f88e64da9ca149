"""Benchmark: tuneforge `task: extractive_qa` vs the Hugging Face Trainer with ``run_qa.py``'s logic.

Data: XQuAD English (the 240 SQuAD v1.1 dev paragraphs of 48 articles, 1,190 questions; Rajpurkar et al.
2016 for SQuAD). Split by article: the paragraphs of the first 40 articles train, the other 8 evaluate (no
context in both). Model: MiniLM-L6 (``minilm-l6``), a fresh QA head. Both sides: max_length 384, doc_stride
128, 2 epochs, batch 16, lr 5e-5, linear decay without warmup, weight decay 0.01, clipping 1.0, fp32, seed 42.

* HF: ``AutoModelForQuestionAnswering`` + ``Trainer``; features, targets and n-best post-processing
  written compactly after transformers' ``examples/pytorch/question-answering/run_qa.py`` (n_best 20,
  max_answer_length 30), scored with the official SQuAD v1.1 EM/F1.
* tuneforge: ``tuneforge.pipeline.train`` on the same two files (group_by_length at its default, on).

Throughput = training windows ("features") / wall time of the training loop, as reported by each tool.

    python benchmarks/bench_qa.py [--epochs 2] [--lr 5e-5] [--batch-size 16] [--only hf|tuneforge] [--threads N]
                                  [--random-batches]

On a shared 2-core CPU the two sides were run at the same time, one thread each (``--only hf --threads 1``
and ``--only tuneforge --threads 1``), so that both see the same contention.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
XQUAD = ROOT.parent / "shared" / "data" / "qa" / "xquad.en.json"
MAX_LEN, STRIDE, N_BEST, MAX_ANSWER = 384, 128, 20, 30


def split_xquad(work: Path, n_train_articles: int = 40) -> tuple[Path, Path]:
    data = json.loads(XQUAD.read_text(encoding="utf-8"))["data"]
    out = []
    for name, part in (("train", data[:n_train_articles]), ("eval", data[n_train_articles:])):
        p = work / f"xquad-{name}.json"
        p.write_text(json.dumps({"version": "1.1", "data": part}), encoding="utf-8")
        out.append(p)
    return out[0], out[1]


def flatten(path: Path) -> list[dict]:
    rows = []
    for art in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"id": qa["id"], "question": qa["question"].lstrip(), "context": para["context"],
                             "answers": [(a["text"], a["answer_start"]) for a in qa["answers"]]})
    return rows


# ----------------------------------------------------------------------------- run_qa.py, compactly
def features(tok, rows: list[dict], train: bool) -> dict:
    enc = tok([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
              max_length=MAX_LEN, stride=STRIDE, return_overflowing_tokens=True, return_offsets_mapping=True)
    smap = enc.pop("overflow_to_sample_mapping")
    starts, ends, offsets = [], [], []
    for i, off in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        r = rows[smap[i]]
        offsets.append([o if seq[k] == 1 else None for k, o in enumerate(off)])
        text, a0 = r["answers"][0]
        a1 = a0 + len(text)
        ts = seq.index(1)
        te = len(seq) - 1 - seq[::-1].index(1)
        if not (off[ts][0] <= a0 and off[te][1] >= a1):
            starts.append(0)
            ends.append(0)
        else:
            while ts < len(off) and off[ts][0] <= a0:
                ts += 1
            while off[te][1] >= a1:
                te -= 1
            starts.append(ts - 1)
            ends.append(te + 1)
    enc.pop("offset_mapping")
    out = dict(enc)
    if train:
        out["start_positions"], out["end_positions"] = starts, ends
    out["_offsets"], out["_example"] = offsets, list(smap)
    return out


def postprocess(rows: list[dict], feats: dict, start_logits, end_logits) -> list[str]:
    per_ex = collections.defaultdict(list)
    for f, e in enumerate(feats["_example"]):
        per_ex[e].append(f)
    preds = []
    for e, r in enumerate(rows):
        best = (-1e9, "")
        for f in per_ex[e]:
            s, t, off = start_logits[f], end_logits[f], feats["_offsets"][f]
            for i in np.argsort(s)[-1:-N_BEST - 1:-1]:
                for j in np.argsort(t)[-1:-N_BEST - 1:-1]:
                    if i >= len(off) or j >= len(off) or off[i] is None or off[j] is None:
                        continue
                    if j < i or j - i + 1 > MAX_ANSWER:
                        continue
                    if s[i] + t[j] > best[0]:
                        best = (s[i] + t[j], r["context"][off[i][0]:off[j][1]])
        preds.append(best[1])
    return preds


def run_hf(a: argparse.Namespace, train_file: Path, eval_file: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from tuneforge.eval.squad import squad_metrics
    from tuneforge.models.registry import resolve_model

    set_seed(a.seed)
    path = resolve_model("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float32)
    tr_rows, ev_rows = flatten(train_file), flatten(eval_file)
    trf, evf = features(tok, tr_rows, True), features(tok, ev_rows, False)
    keep = [k for k in trf if not k.startswith("_")]
    args = TrainingArguments(output_dir=a.work + "/hf", per_device_train_batch_size=a.batch_size,
                             per_device_eval_batch_size=2 * a.batch_size, learning_rate=a.lr,
                             num_train_epochs=a.epochs, weight_decay=0.01, max_grad_norm=1.0, warmup_steps=0,
                             lr_scheduler_type="linear", logging_steps=50, save_strategy="no", report_to=[],
                             seed=a.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({k: trf[k] for k in keep}),
                      data_collator=DataCollatorWithPadding(tok))
    out = trainer.train()
    ev_keep = [k for k in evf if not k.startswith("_")]
    pred = trainer.predict(Dataset.from_dict({k: evf[k] for k in ev_keep}))
    s, e = pred.predictions
    answers = postprocess(ev_rows, evf, s, e)
    m = squad_metrics(answers, [[t for t, _ in r["answers"]] for r in ev_rows])
    return {"train_windows": len(trf["input_ids"]), "train_seconds": out.metrics["train_runtime"],
            "samples_per_s": out.metrics["train_samples_per_second"], **m}


def run_tuneforge(a: argparse.Namespace, train_file: Path, eval_file: Path) -> dict:
    from tuneforge.config import load_config
    from tuneforge.pipeline import train

    run = load_config(None, [
        "task=extractive_qa", "model=minilm-l6", f"data.train={train_file}", f"data.validation={eval_file}",
        f"task.max_length={MAX_LEN}", f"task.doc_stride={STRIDE}", f"train.epochs={a.epochs}",
        f"train.batch_size={a.batch_size}", f"train.lr={a.lr}", "train.warmup_steps=0", "train.schedule=linear",
        "train.weight_decay=0.01", "train.precision=fp32", "train.tensorboard=false", f"train.seed={a.seed}",
        "train.eval_steps=100000", f"train.group_by_length={str(not a.random_batches).lower()}",
        f"output_dir={a.work}/tuneforge"])
    res = train(run, quiet=True, overwrite=True)
    t, v = res.metrics["train"], res.metrics["splits"]["validation"]
    return {"train_seconds": t["train_seconds"], "samples_per_s": t["train_samples_per_s"],
            "exact_match": v["exact_match"], "f1": v["f1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", choices=("hf", "tuneforge"), help="run one side (e.g. both sides in parallel)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--random-batches", action="store_true",
                   help="tuneforge with train.group_by_length=false: random batches like the Trainer's default")
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as work:
        a.work = work
        train_file, eval_file = split_xquad(Path(work))
        print(f"XQuAD-en split by article: train = articles 1-40 ({len(flatten(train_file))} questions), "
              f"eval = articles 41-48 ({len(flatten(eval_file))} questions)")
        res = {}
        for name, fn in (("hf", run_hf), ("tuneforge", run_tuneforge)):
            if a.only and a.only != name:
                continue
            t0 = time.perf_counter()
            res[name] = fn(a, train_file, eval_file)
            res[name]["wall_s"] = time.perf_counter() - t0
            print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res[name].items()}))
        if len(res) == 2:
            print(f"throughput ratio tuneforge/hf: {res['tuneforge']['samples_per_s'] / res['hf']['samples_per_s']:.2f}x")
            for k in ("exact_match", "f1"):
                print(f"{k}: hf {res['hf'][k]:.2f}  tuneforge {res['tuneforge'][k]:.2f}")


if __name__ == "__main__":
    main()
