"""The acceptance scenario on real weights: the bundled SmolLM2 served with two LoRA runs (an SFT run with
SmolLM2's own chat template and a CLM run on play-like text, one training step each: what is checked is the
serving, not the training). The ``openai`` client gets each adapter's reply, streamed and not; each equals
``tuneforge.generation`` on that run; switching adapters per request loads nothing (the base is one module)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.integration

N = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the serve tests' helper
    from serve_support import live_server

    from tuneforge.config import load_config
    from tuneforge.pipeline import train
    from tuneforge.serve import ServeSettings, build_pool, create_app

    tmp = tmp_path_factory.mktemp("serve-smollm2")
    chat = tmp / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": f"{w}!"}]}) + "\n"
                            for w in ("hi", "yes", "no", "ok")))
    text = tmp / "play.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 8)
    common = ["model=smollm2-135m", "method=lora", "train.max_steps=1", "train.batch_size=4",
              "train.tensorboard=false", "train.eval_on_start=false"]
    runs = {"sft": tmp / "sft", "bard": tmp / "bard"}
    train(load_config(None, [*common, "task=sft", f"data.train={chat}", "data.max_length=128",
                             f"output_dir={runs['sft']}"]), quiet=True)
    train(load_config(None, [*common, "task=clm", f"data.train={text}", "data.max_length=32",
                             f"output_dir={runs['bard']}"]), quiet=True)
    settings = ServeSettings()
    pool = build_pool(["smollm2-135m"], [f"sft={runs['sft']}", f"bard={runs['bard']}"], settings)
    with live_server(create_app(pool, settings)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300), runs, pool


def test_each_adapter_replies_streamed_and_not_as_generate(served: Any) -> None:
    from tuneforge.generation import GenerationOptions, generate, load_model

    client, runs, pool = served
    assert {m.id: m.parent for m in client.models.list().data} == {
        "smollm2-135m": None, "sft": "smollm2-135m", "bard": "smollm2-135m"}
    holder = pool.get("sft").holder
    for name, run in runs.items():
        loaded = load_model(run, device="cpu")
        want = generate(loaded.model, loaded.tokenizer, ["say hi"], GenerationOptions(max_new_tokens=N),
                        chat=True, system_prompt=loaded.system_prompt)[0]
        msgs = [{"role": "user", "content": "say hi"}]
        got = client.chat.completions.create(model=name, messages=msgs, max_tokens=N, temperature=0)
        assert got.choices[0].message.content == want
        chunks = client.chat.completions.create(model=name, messages=msgs, max_tokens=N, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert pool.get("bard").holder is holder  # one base module serves both adapters
    assert pool.switches >= 2
