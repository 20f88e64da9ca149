"""``task: seq2seq`` as a user runs it: train from line-aligned gzip files, eval --json, predict, generate, merge,
SIGKILL and resume to the same weights, and bad inputs that exit 2 with one line naming the file:line or key."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
from _common import REPO, cli
from test_resume import kill_when_past_checkpoint, max_abs_diff

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_seq2seq import toy_rows, write_jsonl  # noqa: E402

MAX_STEPS, KILL_AFTER = 24, 8


def _gz(path: Path, lines: list[str]) -> Path:
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("seq2seq-cli")
    rows = toy_rows(120, 0)
    _gz(d / "train.de.gz", [r["source"] for r in rows])
    _gz(d / "train.en.gz", [r["target"] for r in rows])
    write_jsonl(d / "val.jsonl", toy_rows(10, 1))
    return d


def _train_args(run: Path) -> list[str]:
    return ["train", "task=seq2seq", "model=tiny-t5", "data.train.source=train.de.gz", "data.train.target=train.en.gz",
            "data.validation=val.jsonl", f"output_dir={run}", f"train.max_steps={MAX_STEPS}", "train.save_steps=4",
            "train.eval_steps=12", "train.batch_size=8", "train.log_steps=1", "train.lr=1e-2", "train.precision=fp32",
            "train.tensorboard=false", "task.num_beams=2", "task.max_new_tokens=8"]


def test_killed_run_resumes_to_the_same_weights_and_the_tools_work(workdir: Path) -> None:
    resumed, reference = workdir / "resumed", workdir / "reference"
    step = kill_when_past_checkpoint(_train_args(resumed), resumed, workdir, "killed.log", KILL_AFTER)
    out = cli(*_train_args(resumed), "--resume", cwd=workdir)
    assert f"resumed from step {step} of {MAX_STEPS}" in out.stdout
    cli(*_train_args(reference), cwd=workdir)
    last = f"checkpoints/step-{MAX_STEPS:08d}/trainable.safetensors"
    assert max_abs_diff(resumed / last, reference / last) <= 1e-6
    got = json.loads((resumed / "metrics.json").read_text(encoding="utf-8"))["eval"]
    assert got == pytest.approx(json.loads((reference / "metrics.json").read_text(encoding="utf-8"))["eval"], abs=1e-6)

    # eval --json: the generation metrics and the loss, equal to the run's final validation numbers
    ev = json.loads(cli("eval", str(reference), "--data", "val.jsonl", "--json", cwd=workdir).stdout.strip().splitlines()[-1])
    assert {"bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "loss"} <= set(ev)
    assert ev["loss"] == pytest.approx(got["loss"], abs=1e-5) and ev["bleu"] == pytest.approx(got["bleu"], abs=1e-6)

    # predict and generate give the same text for the same source (beam settings of the run vs greedy: both
    # are compared with the run's own settings through predict and with greedy through generate's defaults)
    pred = cli("predict", str(reference), "--input", "val.jsonl", "--output", "pred.jsonl", cwd=workdir)
    assert pred.returncode == 0
    rows = [json.loads(x) for x in (workdir / "pred.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10 and all(isinstance(r["prediction"], str) for r in rows)
    gen = cli("generate", str(reference), toy_rows(1, 1)[0]["source"], "num_beams=2", "max_new_tokens=8", cwd=workdir)
    assert json.loads(gen.stdout.strip().splitlines()[-1])["generation"] == rows[0]["prediction"]

    # merge: a plain AutoModelForSeq2SeqLM folder
    cli("merge", str(reference), str(workdir / "merged"), cwd=workdir)
    from transformers import AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(workdir / "merged").config.is_encoder_decoder


def _one_line_error(workdir: Path, *args: str) -> str:
    proc = cli("train", "task=seq2seq", "model=tiny-t5", "train.max_steps=1", *args, cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_inputs_exit_2_naming_file_line_or_key(workdir: Path) -> None:
    _gz(workdir / "short.en.gz", ["a", "b"])
    msg = _one_line_error(workdir, "data.train.source=train.de.gz", "data.train.target=short.en.gz",
                          "output_dir=bad1")
    assert "train.de.gz:3" in msg and "more lines" in msg
    write_jsonl(workdir / "empty-target.jsonl", [{"source": "a b", "target": "x"}, {"source": "c", "target": ""}])
    msg = _one_line_error(workdir, "data.train=empty-target.jsonl", "output_dir=bad2")
    assert "empty-target.jsonl:2" in msg and "empty target" in msg
    msg = _one_line_error(workdir, "model=tiny-bert", "data.train=val.jsonl", "output_dir=bad3")
    assert "'model'" in msg and "encoder-decoder" in msg
    assert not any((workdir / f"bad{i}").exists() for i in (1, 2, 3))


def test_contrastive_score_outside_the_declared_range_exits_2(workdir: Path) -> None:
    path = workdir / "sts.csv"
    path.write_text("s1,s2,label\na cat,a dog,4.0\na car,a tree,7.5\n", encoding="utf-8")
    proc = cli("train", "task=contrastive", "model=tiny-bert", "data.train=sts.csv", "data.text_column=s1",
               "data.text_pair_column=s2", "task.score_range=[0,5]", "output_dir=bad4", cwd=workdir, check=False)
    assert proc.returncode == 2
    assert "sts.csv:3" in proc.stderr and "outside task.score_range [0, 5]" in proc.stderr
