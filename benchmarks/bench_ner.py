"""Benchmark: tuneforge token classification vs the Hugging Face Trainer on CoNLL-2003 NER, in one invocation.

Both get the same rows (the first ``--train-sents`` sentences of ``eng.train`` and the first ``--dev-sents``
of ``eng.testa``, written to temp CoNLL files), the same model (bundled MiniLM-L6, ``minilm-l6``), 1 epoch,
batch 32, lr 5e-5, linear schedule, no warmup, weight decay 0.01, max_grad_norm 1.0, max_length 128, seed.
Each run is a fresh subprocess that prints JSON:

* ``hf``: ``Trainer`` + ``AutoModelForTokenClassification`` + ``DataCollatorForTokenClassification`` with
  first-sub-token labels (the Hugging Face ``run_ner.py`` recipe), bf16 when the CPU has AVX512-BF16/AMX,
  length-grouped sampling off (plain; ``--hf-group-by-length`` turns it on).
* ``tuneforge``: ``tuneforge.pipeline.train`` with ``task=token_classification`` at its defaults (precision
  auto = bf16 autocast on such CPUs, group_by_length on).

Throughput = training samples / wall time of the training loop (data collation, forward, backward,
clipping, optimizer step; not loading, tokenization or evaluation). Entity F1 is seqeval's default
(conlleval-compatible) micro F1 on the dev rows, computed from per-word (first sub-token) predictions.

    python benchmarks/bench_ner.py [--train-sents 2000] [--dev-sents 500] [--batch-size 32] [--lr 5e-5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "conll2003"
WD, CLIP, MAX_LEN = 0.01, 1.0, 128


def first_sentences(src: Path, dst: Path, n: int) -> int:
    """Copy the first ``n`` sentences (blank-line separated blocks) of a CoNLL file verbatim."""
    blocks, cur = [], []
    for line in src.read_text(encoding="utf-8").splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
            if len(blocks) == n:
                break
    if cur and len(blocks) < n:
        blocks.append(cur)
    dst.write_text("".join("\n".join(b) + "\n\n" for b in blocks), encoding="utf-8")
    return len(blocks)


def read_conll(path: str) -> tuple[list[list[str]], list[list[str]]]:
    words, tags = [], []
    for block in Path(path).read_text(encoding="utf-8").split("\n\n"):
        rows = [r.split() for r in block.splitlines() if r.strip()]
        if rows:
            words.append([r[0] for r in rows])
            tags.append([r[-1] for r in rows])
    return words, tags


def has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------- children
def child_hf(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import transformers as hf
    from datasets import Dataset
    from seqeval.metrics import f1_score

    from tuneforge.models import resolve_model

    path = resolve_model("minilm-l6")
    tok = hf.AutoTokenizer.from_pretrained(path)
    tr_words, tr_tags = read_conll(a.train_file)
    dv_words, dv_tags = read_conll(a.dev_file)
    labels = ["O", *sorted({t for s in tr_tags for t in s} - {"O"}, key=lambda t: (t[2:], t[0]))]
    ids = {n: i for i, n in enumerate(labels)}

    def encode(words, tags):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=MAX_LEN)
        out = []
        for i in range(len(words)):
            prev, row = None, []
            for w in enc.word_ids(i):
                row.append(-100 if w is None or w == prev else ids[tags[i][w]])
                prev = w
            out.append(row)
        enc["labels"] = out
        return Dataset.from_dict(dict(enc))

    train_ds, dev_ds = encode(tr_words, tr_tags), encode(dv_words, dv_tags)
    hf.set_seed(a.seed)
    model = hf.AutoModelForTokenClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=ids, dtype=torch.float32)

    class Clock(hf.TrainerCallback):
        begin = end = 0.0

        def on_train_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.end = time.perf_counter()

    extra: dict = {}
    if has_bf16():
        extra.update(bf16=True, use_cpu=True)
    if a.hf_group_by_length:
        key = "train_sampling_strategy" if "train_sampling_strategy" in hf.TrainingArguments.__dataclass_fields__ \
            else "group_by_length"
        extra[key] = "group_by_length" if key == "train_sampling_strategy" else True
    args = hf.TrainingArguments(
        output_dir=a.workdir, per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=64,
        learning_rate=a.lr, num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0, weight_decay=WD,
        max_grad_norm=CLIP, seed=a.seed, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, **extra)
    clock = Clock()
    trainer = hf.Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                         data_collator=hf.DataCollatorForTokenClassification(tok), callbacks=[clock])
    trainer.train()
    pred = trainer.predict(dev_ds)
    best = np.argmax(pred.predictions, -1)
    gold_out, pred_out = [], []
    for i, row in enumerate(pred.label_ids):
        keep = row != -100
        pred_out.append([labels[k] for k in best[i][keep]])
        # gold from the label ids returned with the predictions: a length-grouped eval sampler may reorder rows
        gold_out.append([labels[k] for k in row[keep]])  # words cut by truncation are not scored
    loop = clock.end - clock.begin
    return {"samples": len(train_ds), "loop_s": loop, "samples_per_s": len(train_ds) / loop,
            "precision": "bf16" if extra.get("bf16") else "fp32", "f1": float(f1_score(gold_out, pred_out)),
            "truncated_words": sum(len(w) for w in dv_words) - sum(len(p) for p in pred_out)}


def child_tuneforge(a: argparse.Namespace) -> dict:
    from tuneforge.config import load_config
    from tuneforge.engine.loop import Trainer
    from tuneforge.pipeline import train

    spent = {"fit": 0.0, "eval_save": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - t0
            return out
        return wrapper

    Trainer.fit = timed(Trainer.fit, "fit")
    Trainer._maybe_eval_and_save = timed(Trainer._maybe_eval_and_save, "eval_save")
    cfg = load_config(None, [
        "model=minilm-l6", "task=token_classification", f"data.train={a.train_file}",
        f"data.validation={a.dev_file}", f"data.max_length={MAX_LEN}", "train.epochs=1",
        f"train.batch_size={a.batch_size}", f"train.lr={a.lr}", "train.warmup_steps=0",
        f"train.weight_decay={WD}", f"train.max_grad_norm={CLIP}", f"train.seed={a.seed}",
        "train.tensorboard=false", f"output_dir={a.workdir}",
        *a.tuneforge_override,
    ])
    m = train(cfg, overwrite=True, quiet=True).metrics
    tr = m["train"]
    samples = round(tr["train_samples_per_s"] * tr["train_seconds"])
    loop = spent["fit"] - spent["eval_save"]
    val = m["splits"]["validation"]
    return {"samples": samples, "loop_s": loop, "samples_per_s": samples / loop, "precision": tr["precision"],
            "f1": val["f1"], "strict_f1": val["strict_f1"], "accuracy": val["accuracy"]}


def run_child(name: str, a: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--train-file", a.train_file, "--dev-file", a.dev_file,
           "--workdir", str(work / name), "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--seed", str(a.seed)]
    if a.hf_group_by_length:
        cmd.append("--hf-group-by-length")
    cmd += [f"--tuneforge-override={o}" for o in a.tuneforge_override]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-sents", type=int, default=2000)
    p.add_argument("--dev-sents", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--hf-group-by-length", action="store_true")
    p.add_argument("--tuneforge-override", action="append", default=[], metavar="K=V",
                   help="extra tuneforge setting (repeatable), e.g. train.embedding_row_grads=false")
    p.add_argument("--child", choices=("hf", "tuneforge"))
    p.add_argument("--train-file", default="")
    p.add_argument("--dev-file", default="")
    p.add_argument("--workdir", default="")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child_hf(a) if a.child == "hf" else child_tuneforge(a)))
        return
    if not (DATA / "eng.train").is_file():
        raise SystemExit(f"CoNLL-2003 not found at {DATA}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a.train_file, a.dev_file = str(work / "train.conll"), str(work / "dev.conll")
        n_tr = first_sentences(DATA / "eng.train", Path(a.train_file), a.train_sents)
        n_dv = first_sentences(DATA / "eng.testa", Path(a.dev_file), a.dev_sents)
        print(f"CoNLL-2003: {n_tr} train / {n_dv} dev sentences, minilm-l6, 1 epoch, batch {a.batch_size}, "
              f"lr {a.lr:g}, max_length {MAX_LEN}, {os.cpu_count()} CPUs")
        res = {name: run_child(name, a, work) for name in ("hf", "tuneforge")}
    print(f"{'run':<11}{'precision':>10}{'samples/s':>11}{'loop s':>9}{'entity F1':>11}")
    for name, r in res.items():
        print(f"{name:<11}{r['precision']:>10}{r['samples_per_s']:>11.1f}{r['loop_s']:>9.1f}{r['f1']:>11.4f}")
    print(f"tuneforge / hf throughput: {res['tuneforge']['samples_per_s'] / res['hf']['samples_per_s']:.2f}x")
    if res["hf"].get("truncated_words"):
        print(f"note: hf truncation at {MAX_LEN} tokens dropped {res['hf']['truncated_words']} dev words "
              f"(scored on the rest); tuneforge windows long sentences")


if __name__ == "__main__":
    main()
