"""The generate / chat / eval verbs on a LoRA SFT run of tiny-llama, in process (typer's runner): adapter
runs load through `methods.saved`, outputs equal the library's, files in and out, chat history commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneforge.cli import app
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.generation import GenerationOptions, generate, load_model
from tuneforge.methods import METHODS
from tuneforge.pipeline import train

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("gen")
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("cat", "dog", "sun", "park", "mat", "rain") * 4]
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    method = "lora" if "lora" in METHODS else "full"
    cfg = load_config(None, [
        "model=tiny-llama", "task=sft", "task.template=chatml", "task.system_prompt=Answer twice.", f"method={method}",
        f"data.train={data}", "data.max_length=128", "train.max_steps=6", "train.batch_size=8", "train.precision=fp32",
        "train.tensorboard=false", f"output_dir={tmp / 'run'}",
    ])
    res = train(cfg, quiet=True)
    return res.run_dir, data


def test_generate_prompts_and_files_from_an_adapter_run(sft_run, tmp_path: Path) -> None:
    run_dir, _ = sft_run
    runner = CliRunner()
    out = runner.invoke(app, ["generate", str(run_dir), "say cat", "say dog", "max_new_tokens=6"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines()]
    loaded = load_model(run_dir)
    assert loaded.chat and loaded.system_prompt == "Answer twice."  # an sft run chats with its system prompt
    expected = generate(loaded.model, loaded.tokenizer, ["say cat", "say dog"], GenerationOptions(max_new_tokens=6),
                        chat=True, system_prompt="Answer twice.")
    assert [r["generation"] for r in rows] == expected
    assert [r["prompt"] for r in rows] == ["say cat", "say dog"]

    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "say cat"}) + "\n"
                       + json.dumps({"id": 2, "messages": [{"role": "user", "content": "say dog"}]}) + "\n")
    result = tmp_path / "out.jsonl"
    out = runner.invoke(app, ["generate", str(run_dir), "--input", str(prompts), "--output", str(result),
                              "max_new_tokens=6"])
    assert out.exit_code == 0, out.output
    got = [json.loads(line) for line in result.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, 2] and [g["generation"] for g in got] == expected


def test_chat_streams_keeps_history_and_quits(sft_run) -> None:
    run_dir, _ = sft_run
    out = CliRunner().invoke(app, ["chat", str(run_dir), "max_new_tokens=4"], input="say cat\n/reset\nsay dog\n/exit\n")
    assert out.exit_code == 0, out.output
    assert out.output.count("assistant> ") == 2 and "/exit quits" in out.output


def test_eval_of_a_registry_model_and_errors(sft_run) -> None:
    run_dir, data = sft_run
    runner = CliRunner()
    out = runner.invoke(app, ["eval", "tiny-llama", "--data", str(data), "task=sft", "task.template=chatml", "--json"])
    assert out.exit_code == 0, out.output
    base = json.loads(out.output)
    trained = json.loads(runner.invoke(app, ["eval", str(run_dir), "--data", str(data), "--json"]).output)
    assert set(base) == {"loss", "perplexity", "tokens"} and base["tokens"] == trained["tokens"]
    assert trained["loss"] < base["loss"]
    err = runner.invoke(app, ["generate", "tiny-bert", "hello"])
    assert isinstance(err.exception, ConfigError) and "needs a decoder" in str(err.exception)
    err = runner.invoke(app, ["generate", "tiny-llama", "hello", "max_tokens=3"])
    assert isinstance(err.exception, ConfigError) and "allowed: max_new_tokens" in str(err.exception)
    err = runner.invoke(app, ["predict", str(run_dir), "hello"])
    assert isinstance(err.exception, ConfigError) and "tuneforge generate" in str(err.exception)


def test_merged_run_generates_the_same_in_plain_transformers(sft_run, tmp_path: Path) -> None:
    if "lora" not in METHODS:
        pytest.skip("method lora is not registered")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.export import merge_run

    run_dir, _ = sft_run
    merge_run(run_dir, tmp_path / "merged")
    folder = tmp_path / "merged"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    msgs = [{"role": "system", "content": "Answer twice."}, {"role": "user", "content": "say sun"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    plain = model.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc["input_ids"].shape[1]:]
    loaded = load_model(run_dir)
    ours = generate(loaded.model, loaded.tokenizer, ["say sun"], GenerationOptions(max_new_tokens=6), chat=True,
                    system_prompt=loaded.system_prompt)
    assert ours == [tok.decode(plain, skip_special_tokens=True)]
