"""The clm and sft objectives through the pipeline on tiny decoders: training lowers held-out loss, packing
modes, methods, report samples, evaluation of a base model by name, and config refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError, DataError
from tuneforge.inference import evaluate_file
from tuneforge.objectives.clm import read_documents
from tuneforge.pipeline import train
from tuneforge.track import read_metrics

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "slept", "in", "sun"]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def _sentence(i: int) -> str:
    return " ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1, 9)) + "."


@pytest.fixture()
def text_files(tmp_path: Path) -> tuple[Path, Path]:
    train = tmp_path / "train.txt"
    train.write_text("\n".join(_sentence(i % 5) for i in range(120)) + "\n", encoding="utf-8")
    val = tmp_path / "val.txt"
    val.write_text("\n".join(_sentence(i % 5) for i in range(10)) + "\n", encoding="utf-8")
    return train, val


@pytest.fixture()
def chat_file(tmp_path: Path) -> Path:
    rows = []
    for i in range(48):
        item = WORDS[i % len(WORDS)]
        rows.append({"instruction": f"Repeat the word {item}.", "input": "", "output": f"{item} {item} {item}"})
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [
        "train.batch_size=8", "train.precision=fp32", "train.lr=3e-3", "train.warmup_steps=0",
        "train.tensorboard=false", "data.max_length=64", f"output_dir={tmp_path / 'run'}", *overrides,
    ])


@pytest.mark.parametrize(("model", "packing"), [("tiny-llama", "blocks"), ("tiny-gpt2", "documents")])
def test_clm_training_lowers_held_out_perplexity(tmp_path: Path, text_files, model: str, packing: str) -> None:
    train_file, val_file = text_files
    base = evaluate_file(Path(model), val_file, ["task=clm", f"task.packing={packing}", "data.max_length=64"])
    res = train(_cfg(tmp_path, f"model={model}", "task=clm", f"task.packing={packing}", f"data.train={train_file}",
                     f"data.validation={val_file}", "train.max_steps=25", "train.eval_on_start=true"), quiet=True)
    val = res.metrics["splits"]["validation"]
    assert val["perplexity"] == pytest.approx(math.exp(val["loss"]))
    assert val["tokens"] == base["tokens"]
    assert val["loss"] < base["loss"] - 1.0
    # eval_on_start: the untrained model, logged as step 0, equals the base model's evaluation
    evals = [r for r in read_metrics(res.run_dir) if r.get("split") == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(base["loss"], abs=1e-4)  # other batching
    assert res.metrics["train"]["best_step"] != 0
    # the run directory evaluates to the same numbers
    again = evaluate_file(res.run_dir, val_file, [])
    assert again["loss"] == pytest.approx(val["loss"], abs=1e-5)
    report = (res.run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Samples" in report and "| prompt | before | after |" in report


def test_sft_packed_with_partial_method_supervises_responses(tmp_path: Path, chat_file: Path) -> None:
    from transformers import AutoTokenizer

    from tuneforge.models import resolve_model

    rows = json.loads(chat_file.read_text())
    val_file = tmp_path / "val.json"
    val_file.write_text(json.dumps(rows[::6]), encoding="utf-8")
    cfg = _cfg(tmp_path, "model=tiny-llama", "task=sft", "task.packing=documents", "method=partial",
               "method.freeze_layers=1", f"data.train={chat_file}", f"data.validation={val_file}", "train.max_steps=30")
    res = train(cfg, quiet=True)
    val = res.metrics["splits"]["validation"]
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    answers = [len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in rows[::6]]  # + EOS
    assert val["tokens"] == sum(answers)  # only response tokens are scored
    base = evaluate_file(Path("tiny-llama"), val_file, ["task=sft", "data.max_length=64"])
    assert base["tokens"] == val["tokens"] and val["loss"] < base["loss"] - 1.0
    folder = res.run_dir / "model"
    assert "### Instruction:" in (folder / "chat_template.jinja").read_text()  # template kept for generation
    report = (res.run_dir / "report.md").read_text(encoding="utf-8")
    assert "| prompt | reference | before | after |" in report
    assert "chat template: alpaca (the tokenizer has no chat template)" in report
    assert "packed into" in report


def test_frozen_is_refused_for_lm_tasks_and_encoders_are_refused(tmp_path: Path, text_files) -> None:
    with pytest.raises(ConfigError, match="'frozen' trains only a task head") as err:
        load_config(None, ["task=clm", "method=frozen"])
    assert err.value.key == "method.name"
    cfg = _cfg(tmp_path, "model=tiny-bert", "task=clm", f"data.train={text_files[0]}")
    with pytest.raises(ConfigError, match="is an encoder model") as err:
        train(cfg, quiet=True)
    assert err.value.key == "model" and not (tmp_path / "run").exists()


def test_base_model_evaluation_only_for_lm_tasks(tmp_path: Path, text_files) -> None:
    with pytest.raises(ConfigError, match="not a finished tuneforge run"):
        evaluate_file(Path("tiny-llama"), text_files[1], [])  # classification needs a trained run, as before
    with pytest.raises(ConfigError, match="neither a known model"):
        evaluate_file(tmp_path / "nowhere", text_files[1], ["task=clm"])


def test_txt_units_and_single_stream_carving(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text("A:\nhello there\n\nB:\ngood day\n\n\nA:\nfarewell\n", encoding="utf-8")
    cfg = lambda unit: load_config(None, ["task=clm", f"task.txt_unit={unit}"])  # noqa: E731
    assert read_documents(cfg("line"), path).texts == ["A:", "hello there", "B:", "good day", "A:", "farewell"]
    para = read_documents(cfg("paragraph"), path)
    assert para.texts == ["A:\nhello there", "B:\ngood day", "A:\nfarewell"] and para.lines == [1, 4, 8]
    assert read_documents(cfg("file"), path).texts == ["A:\nhello there\n\nB:\ngood day\n\n\nA:\nfarewell"]
    from tuneforge.objectives.clm import _carve

    doc = read_documents(cfg("file"), path)
    train_docs, val_docs, how = _carve(doc, 0.3, 0)
    assert train_docs.texts == ["A:\nhello there\n\nB:\ngood day"] and val_docs.texts == ["A:\nfarewell"]
    assert val_docs.lines == [8] and "single document (from line 8)" in how
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="expected a string") as err:
        read_documents(load_config(None, ["task=clm"]), bad)
    assert err.value.line == 2


def _every_method() -> list[str]:
    from tuneforge.methods import METHODS

    return sorted(m for m in METHODS if m != "frozen")


@pytest.mark.parametrize("method", _every_method())
def test_every_method_trains_sft_and_generates(tmp_path: Path, chat_file: Path, method: str) -> None:
    """tiny-gpt2 (it has biases, for bitfit; qat, which needs nn.Linear layers, on tiny-llama): two steps,
    then the saved run reloads and generates."""
    from tuneforge.generation import GenerationOptions, generate, load_model

    model = "tiny-llama" if method == "qat" else "tiny-gpt2"
    res = train(_cfg(tmp_path, f"model={model}", "task=sft", f"method={method}", f"data.train={chat_file}",
                     "train.max_steps=2", "data.max_eval_samples=4"), quiet=True)
    assert math.isfinite(res.metrics["splits"]["validation"]["loss"])
    loaded = load_model(res.run_dir)
    out = generate(loaded.model, loaded.tokenizer, ["Repeat the word cat."], GenerationOptions(max_new_tokens=3), chat=True)
    assert len(out) == 1


@pytest.mark.parametrize("method", sorted({"prefix", "prompt", "ptuning_v2"}))
def test_document_packing_is_refused_with_virtual_token_methods(method: str) -> None:
    with pytest.raises(ConfigError, match=r"use task\.packing=none") as err:
        load_config(None, ["task=sft", "task.packing=documents", f"method={method}"])
    assert err.value.key == "task.packing"
