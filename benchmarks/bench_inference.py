"""Benchmark: inference speed, tuneforge vs plain transformers on the same inputs and the same weights.

Two parts, each run in a fresh subprocess (so peak RSS is each run's own):

* **predict** (classification): an SST-2 MiniLM-L6 run (``--run DIR``, or one trained once by this script
  into ``--work-dir``: 2,000 seeded training rows, 1 epoch) labels the SST-2 dev sentences.

  * ``tf-predict``:    what ``tuneforge predict`` runs (``inference.predict_texts``): the run is loaded first
                       (timed apart, as the pipeline's model is loaded before its clock starts), then the
                       clock covers tokenizing and length-sorted batches under ``no_grad`` and the run's
                       precision (bf16 autocast where `precision: auto` finds it faster than fp32).
  * ``hf-pipeline``:   ``transformers.pipeline("text-classification")`` over the same folder at its defaults
                       (one text per forward), the model loaded before the clock starts.
  * ``hf-pipeline-b``: the same with ``batch_size`` equal to tuneforge's eval batch (64).

  Accuracy against the gold labels and agreement with tuneforge's labels are printed for every run.

* **generate** (greedy): SmolLM2-135M-Instruct (``smollm2-135m``) answers ``--prompts`` alpaca instructions
  rendered with its chat template, ``--max-new-tokens`` each, fp32 weights.

  * ``hf-generate``:   plain ``model.generate`` one prompt at a time (greedy, the model's own defaults).
  * ``hf-generate-b``: plain ``model.generate`` on left-padded batches of ``--gen-batch`` in input order.
  * ``tf-generate``:   ``tuneforge.generation.generate`` (what ``tuneforge generate`` calls) with
                       ``batch_size=--gen-batch``.

  tokens/s = generated tokens (up to and including EOS) / wall time of the generation calls. Every run also
  prints its cpu util (process CPU time / (wall time x torch threads)); a warning names runs below 85%. Every run's
  token ids are compared with ``hf-generate``'s; the script fails if tuneforge's differ (greedy equality).

    python benchmarks/bench_inference.py [--rows 0] [--prompts 32] [--max-new-tokens 48] [--only predict|generate]
        [--device auto|cpu|cuda]

``--device auto`` runs on CUDA when present (the pipeline, ``model.generate`` and tuneforge alike; each run
also reports its peak GPU memory); results then go to ``results/inference-cuda.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    add_device_arg,
    cpu_clock,
    describe_device,
    device_peak_mib,
    fmt_mib,
    gpu_name,
    peak_rss_mib,
    pick_device,
    results_path,
    synchronize,
    warn_if_shared,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SST2 = DATA / "sst2"
ALPACA = DATA / "instruct" / "alpaca_en_demo.json"
RESULTS = ROOT / "benchmarks" / "results" / "inference.json"
PREDICT_RUNS = ("hf-pipeline", "hf-pipeline-b", "tf-predict")
GENERATE_RUNS = ("hf-generate", "hf-generate-b", "tf-generate")


def _dev(rows: int) -> tuple[list[str], list[int]]:
    with open(SST2 / "dev.tsv", encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[: rows or None]
    return [r["sentence"] for r in table], [int(r["label"]) for r in table]


def _prompts(n: int) -> list[str]:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    return [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")) for r in rows[:n]]


def ensure_run(work: Path) -> Path:
    """A small SST-2 classification run (MiniLM-L6, 2,000 seeded training rows, one epoch), trained once."""
    run_dir = work / "sst2-minilm"
    if (run_dir / "model" / "config.json").is_file():
        return run_dir
    import random

    from tuneforge.config import load_config
    from tuneforge.pipeline import train

    with open(SST2 / "train.tsv", encoding="utf-8") as f:
        header, *lines = f.read().splitlines()
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.tsv").write_text("\n".join([header, *random.Random(42).sample(lines, 2000)]) + "\n", encoding="utf-8")
    train(load_config(None, [
        "model=minilm-l6", f"data.train={work / 'train.tsv'}", f"data.validation={SST2 / 'dev.tsv'}",
        "data.quoting=false", "data.text_column=sentence", "data.label_column=label", "train.epochs=1",
        "train.lr=5e-5", "train.seed=42", "train.tensorboard=false", f"output_dir={run_dir}"]), overwrite=True, quiet=True)
    # (trained on the default device: CUDA when present; the weights are saved as float either way)
    return run_dir


def run_predict(name: str, a: argparse.Namespace) -> dict:
    texts, gold = _dev(a.rows)
    load_seconds = None
    if name == "tf-predict":
        from tuneforge.inference import _runtime, load_run

        # what `tuneforge predict` (inference.predict_texts) runs, with loading timed apart as for the pipeline
        t0 = time.perf_counter()
        run = load_run(a.run, [f"train.device={a.device}", *a.tuneforge_override])
        objective, built, runtime, batch_size = _runtime(run, a.run)
        load_seconds = time.perf_counter() - t0
        with cpu_clock() as clock:
            rows = objective.predict(built, texts, None, batch_size=batch_size, runtime=runtime)
            synchronize(a.device)
        labels = [int(r["label"]) for r in rows]
    else:
        import torch
        from transformers import pipeline

        clf = pipeline("text-classification", model=str(a.run / "model"), device=torch.device(a.device))
        kwargs = {"batch_size": a.hf_batch} if name == "hf-pipeline-b" else {}
        with cpu_clock() as clock:
            out = clf(texts, truncation=True, **kwargs)
            synchronize(a.device)
        label2id = clf.model.config.label2id
        labels = [int(label2id[o["label"]]) if o["label"] in label2id else int(o["label"]) for o in out]
    acc = sum(int(p == g) for p, g in zip(labels, gold, strict=True)) / len(gold)
    seconds = clock["wall_s"]
    return {"texts": len(texts), "seconds": seconds, "texts_per_s": len(texts) / seconds, "accuracy": acc,
            "load_seconds": load_seconds, "labels": labels, "peak_rss_mib": peak_rss_mib(),
            "gpu_peak_mib": device_peak_mib(a.device), "cpu_util": clock["cpu_util"]}


def _new_tokens(row: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (what follows is padding of a finished row)."""
    out = []
    for t in row:
        out.append(t)
        if t in eos:
            break
    return out


def run_generate(name: str, a: argparse.Namespace) -> dict:
    import torch

    from tuneforge.generation import GenerationOptions, generate, load_model

    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", device=a.device)
    model, tok = loaded.model, loaded.tokenizer
    prompts = _prompts(a.prompts)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    ids: list[list[int]] = []
    if name == "tf-generate":
        with cpu_clock() as clock:
            outs = generate(model, tok, prompts,
                            GenerationOptions(max_new_tokens=a.max_new_tokens, batch_size=a.gen_batch), chat=True)
            synchronize(a.device)
        # tuneforge returns text (special tokens skipped), compared below with the decoded ids of the HF runs
        return {"prompts": len(prompts), "seconds": clock["wall_s"], "texts": outs, "peak_rss_mib": peak_rss_mib(),
                "gpu_peak_mib": device_peak_mib(a.device), "cpu_util": clock["cpu_util"]}
    step = 1 if name == "hf-generate" else a.gen_batch
    with cpu_clock() as clock, torch.inference_mode():
        for s in range(0, len(texts), step):
            enc = tok(texts[s : s + step], return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=False).to(model.device)
            seqs = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
            ids += [_new_tokens(r, eos) for r in seqs[:, enc["input_ids"].shape[1]:].tolist()]
    return {"prompts": len(prompts), "seconds": clock["wall_s"], "ids": ids, "cpu_util": clock["cpu_util"],
            "texts": [tok.decode(x, skip_special_tokens=True) for x in ids], "tokens": sum(len(x) for x in ids),
            "peak_rss_mib": peak_rss_mib(), "gpu_peak_mib": device_peak_mib(a.device)}


def _child(name: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--rows", str(a.rows), "--prompts", str(a.prompts),
           "--max-new-tokens", str(a.max_new_tokens), "--gen-batch", str(a.gen_batch), "--hf-batch", str(a.hf_batch),
           "--device", a.device, *(f"--tuneforge-override={o}" for o in a.tuneforge_override)]
    if a.run is not None:
        cmd += ["--run", str(a.run)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a finished SST-2 classification run (default: train one once)")
    p.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "bench-inference")
    p.add_argument("--rows", type=int, default=0, help="first N SST-2 dev sentences to label (0 = all 6,735)")
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--only", choices=("predict", "generate"))
    p.add_argument("--tuneforge-override", action="append", default=[], metavar="K=V",
                   help="extra setting for tf-predict's run (repeatable), e.g. train.precision=fp32")
    p.add_argument("--one", choices=PREDICT_RUNS + GENERATE_RUNS, help=argparse.SUPPRESS)
    add_device_arg(p)
    a = p.parse_args()
    a.device = pick_device(a.device)
    if a.one:
        res = run_predict(a.one, a) if a.one in PREDICT_RUNS else run_generate(a.one, a)
        print("RESULT " + json.dumps(res))
        return
    for f in (SST2 / "dev.tsv", ALPACA):
        if not f.is_file():
            sys.exit(f"{f} not found (the shared data folder)")
    import os

    print(f"load average at start: {os.getloadavg()[0]:.1f} (numbers are only comparable within one invocation); "
          f"device {describe_device(a.device)}")
    results: dict[str, dict] = {}
    failure = None
    if a.only in (None, "predict"):
        a.run = a.run or ensure_run(a.work_dir)
        for name in PREDICT_RUNS:
            results[name] = r = _child(name, a)
            load = f", +{r['load_seconds']:.2f} s loading the run" if r["load_seconds"] is not None else ""
            print(f"{name:>14}: {r['texts_per_s']:8.1f} texts/s ({r['seconds']:.2f} s{load}), accuracy "
                  f"{100 * r['accuracy']:.2f}%, peak RSS {r['peak_rss_mib']:.0f} MiB, GPU {fmt_mib(r['gpu_peak_mib'])} "
                  f"MiB, cpu util "
                  f"{100 * r['cpu_util']:.0f}%", flush=True)
        ref = results["tf-predict"]["labels"]
        for name in ("hf-pipeline", "hf-pipeline-b"):
            same = sum(int(x == y) for x, y in zip(results[name]["labels"], ref, strict=True))
            ratio = results["tf-predict"]["texts_per_s"] / results[name]["texts_per_s"]
            print(f"tf-predict / {name}: {ratio:.2f}x, same label on {same}/{len(ref)} texts")
    if a.only in (None, "generate"):
        for name in GENERATE_RUNS:
            results[name] = r = _child(name, a)
        ref = results["hf-generate"]
        tokens = ref["tokens"]
        for name in GENERATE_RUNS:
            r = results[name]
            r["tokens"] = tokens  # the same outputs (checked below), so the same token count
            r["tokens_per_s"] = tokens / r["seconds"]
            equal = sum(int(x == y) for x, y in zip(r["texts"], ref["texts"], strict=True))
            r["equal_outputs"] = equal
            print(f"{name:>14}: {r['tokens_per_s']:8.1f} tokens/s ({r['seconds']:.2f} s, {tokens} tokens), "
                  f"greedy output equal to hf-generate on {equal}/{len(ref['texts'])} prompts, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB, GPU {fmt_mib(r['gpu_peak_mib'])} MiB, cpu util "
                  f"{100 * r['cpu_util']:.0f}%", flush=True)
        for name in ("hf-generate", "hf-generate-b"):
            print(f"tf-generate / {name}: {results['tf-generate']['tokens_per_s'] / results[name]['tokens_per_s']:.2f}x")
        tf_eq, hf_b_eq, n = results["tf-generate"]["equal_outputs"], results["hf-generate-b"]["equal_outputs"], len(ref["texts"])
        # CPU: exact equality with one-at-a-time model.generate. CUDA: batched (padded) matmuls may round differently
        # from unbatched ones and flip a near-tie argmax, as they do for model.generate's own batches; there
        # tuneforge must match one-at-a-time generation at least as often as model.generate on batches does.
        if tf_eq < (n if a.device == "cpu" else hf_b_eq):
            failure = f"tf-generate's greedy outputs differ from model.generate's ({tf_eq}/{n} equal)"
    if a.device == "cpu":
        warn_if_shared({name: r["cpu_util"] for name, r in results.items()})
    out = results_path(RESULTS, a.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = {k: {f: v for f, v in r.items() if f not in ("labels", "ids", "texts")} for k, r in results.items()}
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "gpu": gpu_name(a.device),
                               "results": slim}, indent=2) + "\n")
    if failure:
        sys.exit(failure)


if __name__ == "__main__":
    main()
