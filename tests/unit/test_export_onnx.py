"""`tuneforge export --format onnx`: onnxruntime reproduces PyTorch within the stated tolerance on a probe
batch of another shape than the traced one (dynamic axes), for an encoder classifier with LoRA folded in and
a decoder's plain forward and an encoder-decoder's (tiny T5, seq2seq with LoRA: logits of the full
teacher-forced forward, decoder length dynamic too); the run's metric on a file is the same with PyTorch and ONNX; int8 is written;
methods that cannot merge are refused with the reason."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import TuneforgeError
from tuneforge.pipeline import train

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("onnx")
    words = ["good", "great", "bad", "awful", "film", "book"]
    with (d / "train.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(40):
            w.writerow([" ".join(words[(i * k) % 6] for k in range(1, 4 + i % 3)), "pos" if i % 2 else "neg"])
    with (d / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for i in range(16):
            f.write(json.dumps({"source": f"translate: {words[i % 6]} {words[(i + 1) % 6]}",
                                "target": f"{words[(i + 2) % 6]} {words[i % 6]}"}) + "\n")
    (d / "text.txt").write_text("".join(f"the {w} is here and {w} is there\n" for w in words * 4), encoding="utf-8")
    return d


def _run(out: Path, *args: str) -> Path:
    train(load_config(None, [*args, "train.max_steps=3", "train.batch_size=8", "train.tensorboard=false",
                             f"output_dir={out}"]), quiet=True)
    return out


def test_classifier_with_lora_exports_and_scores_the_same(rows: Path, tmp_path: Path) -> None:
    from tuneforge.export.onnx import TOLERANCE, export_onnx

    run = _run(tmp_path / "cls", "model=tiny-bert", "method=lora", f"data.train={rows / 'train.csv'}")
    info = export_onnx(run, tmp_path / "out", int8=True, data=rows / "train.csv")
    assert info["max_abs_diff"] <= TOLERANCE and info["opset"] == 18
    assert info["inputs"][:2] == ["input_ids", "attention_mask"] and info["outputs"] == ["logits"]
    m = info["metrics"]
    assert m["onnx"]["accuracy"] == m["pytorch"]["accuracy"]
    assert m["onnx"]["loss"] == pytest.approx(m["pytorch"]["loss"], abs=1e-4)
    assert (tmp_path / "out" / "model.int8.onnx").is_file() and "int8" in m
    assert json.loads((tmp_path / "out" / "export.json").read_text(encoding="utf-8"))["max_abs_diff"] <= TOLERANCE
    assert (tmp_path / "out" / "labels.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_decoder_plain_forward_matches(rows: Path, tmp_path: Path) -> None:
    from tuneforge.export.onnx import OrtModel, export_onnx

    run = _run(tmp_path / "clm", "model=tiny-llama", "task=clm", f"data.train={rows / 'text.txt'}", "data.max_length=16")
    info = export_onnx(run, tmp_path / "out")
    assert info["kv_cache"] is False and info["outputs"] == ["logits"]
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 12, 40, 41, 7, 8], [6, 7, 8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    ref = AutoModelForCausalLM.from_pretrained(run / "model").eval()(input_ids=ids, attention_mask=mask).logits
    got = OrtModel(tmp_path / "out" / "model.onnx")(input_ids=ids, attention_mask=mask).logits
    assert float((got - ref.detach()).abs().max()) < 1e-4


def test_t5_seq2seq_full_forward_matches(rows: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from tuneforge.errors import ConfigError
    from tuneforge.export.onnx import TOLERANCE, OrtModel, export_onnx

    run = _run(tmp_path / "t5", "model=tiny-t5", "task=seq2seq", "method=lora", f"data.train={rows / 'pairs.jsonl'}",
               "task.max_new_tokens=4", "task.num_beams=1")
    info = export_onnx(run, tmp_path / "out")
    assert info["inputs"] == ["input_ids", "attention_mask", "decoder_input_ids"] and info["outputs"] == ["logits"]
    assert info["max_abs_diff"] <= TOLERANCE and info["kv_cache"] is False
    assert info["dynamic_axes"]["decoder_sequence"] == 1

    ort = OrtModel(tmp_path / "out" / "model.onnx")
    torch_model = AutoModelForSeq2SeqLM.from_pretrained(_merged(run, tmp_path))  # the LoRA folded in, plain HF
    for enc, dec in ((5, 2), (11, 7)):  # lengths other than the traced (9, 5)
        g = torch.Generator().manual_seed(enc)
        ids, dec_ids = torch.randint(5, 100, (2, enc), generator=g), torch.randint(5, 100, (2, dec), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        with torch.no_grad():
            want = torch_model.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        got = ort(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        assert got.shape == want.shape == (2, dec, torch_model.config.vocab_size)
        assert float((got - want).abs().max()) < TOLERANCE
    with pytest.raises(ConfigError, match="generation") as err:
        export_onnx(run, tmp_path / "out2", data=rows / "pairs.jsonl")
    assert err.value.key == "--data"


def _merged(run: Path, tmp_path: Path) -> Path:
    from tuneforge.export import merge_run

    return merge_run(run, tmp_path / "merged").out_dir


def test_method_that_cannot_merge_is_refused(rows: Path, tmp_path: Path) -> None:
    from tuneforge.export.onnx import export_onnx

    run = _run(tmp_path / "prompt", "model=tiny-bert", "method=prompt", f"data.train={rows / 'train.csv'}")
    with pytest.raises(TuneforgeError, match="method 'prompt' cannot be exported") as info:
        export_onnx(run, tmp_path / "out")
    assert info.value.exit_code == 2 and not (tmp_path / "out").exists()
