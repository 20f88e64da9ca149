"""Benchmark: `tuneforge serve` batching, latency and adapter switching on one base with two LoRA adapters.

Setup: the base (``--model``, default the bundled ``smollm2-135m``) and two LoRA runs made on it with the
real pipeline (``task=sft`` on a few chat rows, ``task=clm`` on a few lines: ``--steps`` steps each; the
weights only need to exist, the timing is what is measured), served by an in-process uvicorn server on
127.0.0.1; clients are the official ``openai`` package, one thread per concurrent request.

* **batched**: ``--requests`` short greedy chat requests (``--max-tokens`` each) sent at once to adapter
  ``a``; the server batches them (``--max-batch-size``, 20 ms window).
* **one at a time**: the same requests sent sequentially (each waits for the previous reply), with the
  batching window set to 0 for this phase so the baseline pays no batching wait.
* **ratio**: batched throughput / one-at-a-time throughput (requests per second), p50/p95 latency of each.
* **mixed**: the same number of requests at once, alternating adapter ``a`` (chat), adapter ``b`` and the
  base (``/v1/completions``, raw text): every
  reply is checked against the one-at-a-time reply of its model (outputs per adapter correct).
* **adapter switch**: the server's own measure (``/metrics``: seconds spent in ``activate`` / switches),
  and the latency of alternating single requests a, b, a, b... minus that of a, a, a... (what a user sees).

    python benchmarks/bench_serve.py [--model smollm2-135m] [--requests 32] [--max-tokens 16] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))  # serve_support: the live-server helper the tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = ["say hi", "name a color", "count to three", "what is two plus two", "say a fruit", "name an animal",
           "greet me", "say a city"]


def _runs(model: str, steps: int, where: Path) -> dict[str, Path]:
    from tuneforge.config import load_config
    from tuneforge.pipeline import train

    out = {}
    chat = where / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": "ok: " + p}]}) + "\n"
                            for p in PROMPTS * 2))
    text = where / "text.txt"
    text.write_text("".join(f"to be or not to be, line {i} of the play\n" for i in range(16)))
    common = [f"model={model}", "method=lora", f"train.max_steps={steps}", "train.batch_size=4",
              "train.tensorboard=false", "data.max_length=64", "train.eval_on_start=false"]
    from transformers import AutoTokenizer

    from tuneforge.models.registry import resolve_model

    template = [] if AutoTokenizer.from_pretrained(resolve_model(model)).chat_template else ["task.template=chatml"]
    for name, extra in (("a", ["task=sft", f"data.train={chat}", "data.max_length=128", *template]),
                        ("b", ["task=clm", f"data.train={text}"])):
        out[name] = where / name
        if not (out[name] / "model").is_dir():
            train(load_config(None, [*common, *extra, f"output_dir={out[name]}"]), quiet=True)
    return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--switches", type=int, default=8)
    ap.add_argument("--work-dir", default=None, help="keep the adapter runs here (reused when present)")
    args = ap.parse_args()

    import openai
    from serve_support import live_server

    from tuneforge.serve import ServeSettings, build_pool, create_app

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = _runs(args.model, args.steps, work)
    print(f"adapters ready in {time.perf_counter() - t0:.1f} s ({work})")
    settings = ServeSettings(max_batch_size=args.max_batch_size, batch_window_ms=20, max_queue=1024)
    pool = build_pool([args.model], [f"a={runs['a']}", f"b={runs['b']}"], settings)
    msgs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(args.requests)]

    app = create_app(pool, settings)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

        def chat(model: str, m: list[dict[str, str]]) -> tuple[float, str, int]:
            s = time.perf_counter()
            if model != "a":  # the CLM adapter and the base: raw continuation (no chat template needed)
                r = client.completions.create(model=model, prompt=m[0]["content"], max_tokens=args.max_tokens,
                                              temperature=0)
                return time.perf_counter() - s, r.choices[0].text, r.usage.completion_tokens
            r = client.chat.completions.create(model=model, messages=m, max_tokens=args.max_tokens, temperature=0)
            return time.perf_counter() - s, r.choices[0].message.content or "", r.usage.completion_tokens

        n = args.requests
        print(f"model {args.model}, {n} chat requests of max_tokens={args.max_tokens} (greedy), "
              f"torch threads {__import__('torch').get_num_threads()}, cpus {os.cpu_count()}", flush=True)
        batcher = app.state.serve.batcher
        chat("a", msgs[0])  # warm-up
        batcher.window_s = 0.0  # one at a time: no batching wait either, the fairest sequential baseline
        s = time.perf_counter()
        seq = [chat("a", m) for m in msgs]
        seq_wall = time.perf_counter() - s
        batcher.window_s = settings.batch_window_ms / 1000
        _line("one at a time", seq, seq_wall)
        with ThreadPoolExecutor(n) as ex:
            s = time.perf_counter()
            par = list(ex.map(lambda m: chat("a", m), msgs))
            par_wall = time.perf_counter() - s
        _line("batched", par, par_wall)
        same = sum(p[1] == q[1] for p, q in zip(par, seq, strict=True))
        print(f"ratio batched / one at a time: {seq_wall / par_wall:.2f}x  "
              f"(batched replies equal to the sequential ones: {same}/{n})", flush=True)

        models = ["a", "b", args.model]
        mixed_jobs = [(models[i % 3], msgs[i]) for i in range(n)]
        want: dict[tuple[str, str], str] = {}  # one-at-a-time reply of each (model, prompt)
        for m, x in mixed_jobs:
            key = (m, x[0]["content"])
            if key not in want:
                want[key] = chat(m, x)[1]
        with ThreadPoolExecutor(n) as ex:
            s = time.perf_counter()
            mixed = list(ex.map(lambda j: chat(*j), mixed_jobs))
            mixed_wall = time.perf_counter() - s
        mixed_ok = sum(r[1] == want[(m, x[0]["content"])] for r, (m, x) in zip(mixed, mixed_jobs, strict=True))
        print(f"mixed a/b/base at once: {n / mixed_wall:.2f} req/s, replies correct per model {mixed_ok}/{n}, "
              f"wall {mixed_wall:.2f} s", flush=True)

        one = msgs[0]
        same_lat = [chat("a", one)[0] for _ in range(args.switches)]
        alt_lat = [chat("a" if i % 2 == 0 else "b", one)[0] for i in range(args.switches)]
        import httpx

        text = httpx.get(url + "/metrics").text
        switches = float(re.search(r"adapter_switches_total (\S+)", text).group(1))
        switch_s = float(re.search(r"adapter_switch_seconds_total (\S+)", text).group(1))
        batches = float(re.search(r"batches_total (\S+)", text).group(1))
    print(f"adapter switch (server, activate): {1000 * switch_s / max(switches, 1):.3f} ms over {switches:.0f} "
          f"switches; alternating a/b single requests p50 {statistics.median(alt_lat):.3f} s vs same adapter "
          f"{statistics.median(same_lat):.3f} s (difference "
          f"{1000 * (statistics.median(alt_lat) - statistics.median(same_lat)):+.1f} ms); batches run: {batches:.0f}")


def _line(label: str, results: list[tuple[float, str, int]], wall: float) -> None:
    lat = [r[0] for r in results]
    toks = sum(r[2] for r in results)
    print(f"{label:14s}: {len(results) / wall:7.2f} req/s  {toks / wall:8.1f} tok/s  p50 {statistics.median(lat):.3f} s"
          f"  p95 {_pct(lat, 0.95):.3f} s  wall {wall:.2f} s", flush=True)


if __name__ == "__main__":
    main()
