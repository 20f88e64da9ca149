"""Helpers for the serve tests: tiny LoRA runs on tiny-llama made with the real pipeline, and a live
uvicorn server on 127.0.0.1 with a free port, run in a thread for the duration of a ``with`` block."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneforge.config import load_config
from tuneforge.pipeline import train


def train_sft(tmp: Path, name: str, word: str, steps: int = 6, extra: tuple[str, ...] = ()) -> Path:
    """A LoRA SFT run of tiny-llama that learns to answer ``word word`` (chatml template, system prompt)."""
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{word} {w}"}]}
            for w in ("cat", "dog", "sun", "park") * 4]
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(None, [
        "model=tiny-llama", "task=sft", "task.template=chatml", f"task.system_prompt=Answer with {word}.",
        "method=lora", f"data.train={data}", "data.max_length=128", f"train.max_steps={steps}", "train.batch_size=8",
        "train.precision=fp32", "train.tensorboard=false", "train.lr=5e-3", f"output_dir={tmp / name}",
        *extra,
    ])
    return train(cfg, quiet=True).run_dir


def train_clm(tmp: Path, name: str, steps: int = 6, model: str = "tiny-llama") -> Path:
    """A LoRA CLM run of ``model`` on a few lines of text (raw continuation, no chat template)."""
    data = tmp / f"{name}.txt"
    data.write_text("".join(f"the {w} sat on the mat and the {w} was glad\n" for w in ("cat", "dog", "owl") * 6))
    cfg = load_config(None, [
        f"model={model}", "task=clm", "method=lora", f"data.train={data}", "data.max_length=32",
        f"train.max_steps={steps}", "train.batch_size=8", "train.precision=fp32", "train.tensorboard=false",
        "train.lr=5e-3", f"output_dir={tmp / name}",
    ])
    return train(cfg, quiet=True).run_dir


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
