"""SIGKILL and resume for the task-head objectives: NER (token classification), extractive QA, a multi-task run
killed mid-epoch, and a classification run with every cure for forgetting (L2-SP, EWC, distillation, replay). The
resumed run must end with the same weights (1e-6) as the same run done in one go, which needs each
objective's batches (windows, one-task-per-batch plans) rebuilt identically and the cures' anchors, cached
Fisher and teacher taken from the starting weights, not from the resumed ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _common import REPO, cli
from test_resume import kill_when_past_checkpoint, max_abs_diff

pytestmark = pytest.mark.e2e

MAX_STEPS = 24
KILL_AFTER = 10

sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_extractive_qa import synthetic_rows  # noqa: E402
from test_extractive_qa import write_jsonl as write_qa  # noqa: E402
from test_multitask import write_sentiment  # noqa: E402
from test_token_classification import make_sentences, write_conll  # noqa: E402


def _case_args(case: str) -> list[str]:
    if case == "ner":
        return ["task=token_classification", "data.train=ner.train", "data.validation=ner.val"]
    if case == "qa":
        return ["task=extractive_qa", "data.train=qa-train.jsonl", "data.validation=qa-val.jsonl", "task.max_length=64", "task.max_question_length=16",
                "task.doc_stride=24"]
    if case == "retain":  # every cure for forgetting at once: anchors, Fisher and teacher survive the kill
        return ["data.train=cls.csv", "data.validation=cls-val.csv", "retain.l2sp.alpha=0.5", "retain.l2sp.beta=0.01",
                "retain.ewc.fisher_data=cls-val.csv", "retain.ewc.fisher_samples=8", "retain.ewc.lambda=50",
                "retain.distill.weight=0.5", "retain.replay.data=cls-val.csv", "retain.replay.ratio=0.25"]
    return ["task=multitask", "task.sampling=temperature", "task.temperature=3",
            "task.tasks.cls.task=classification", "task.tasks.cls.data.train=cls.csv",
            "task.tasks.cls.data.validation=cls-val.csv",
            "task.tasks.ner.task=token_classification", "task.tasks.ner.data.train=ner.train",
            "task.tasks.ner.data.validation=ner.val"]


def _args(case: str, run: Path) -> list[str]:
    return ["train", "model=tiny-bert", *_case_args(case), f"output_dir={run}", f"train.max_steps={MAX_STEPS}",
            "train.save_steps=4", "train.eval_steps=12", "train.batch_size=4", "train.log_steps=1", "train.lr=1e-2",
            "train.precision=fp32", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resume-tasks")
    rows = make_sentences(140, seed=4)
    write_conll(d / "ner.train", rows[:120])
    write_conll(d / "ner.val", rows[120:])
    qa = synthetic_rows(120, seed=3)
    write_qa(d / "qa-train.jsonl", qa[:100])
    write_qa(d / "qa-val.jsonl", qa[100:])
    write_sentiment(d / "cls.csv", 60, 0)
    write_sentiment(d / "cls-val.csv", 12, 1)
    return d


# ner alone is slow-marked: the multitask case resumes a token-classification task inside the same kill
@pytest.mark.parametrize("case", [pytest.param("ner", marks=pytest.mark.slow), "qa", "multitask", "retain"])
def test_killed_run_resumes_to_the_same_weights(case: str, workdir: Path) -> None:
    resumed, reference = workdir / f"resumed-{case}", workdir / f"reference-{case}"
    step = kill_when_past_checkpoint(_args(case, resumed), resumed, workdir, f"killed-{case}.log", KILL_AFTER)
    state = json.loads((resumed / "checkpoints" / f"step-{step:08d}" / "state.json").read_text(encoding="utf-8"))
    assert state["batch_in_epoch"] > 0, "the kill should land mid-epoch"
    out = cli(*_args(case, resumed), "--resume", cwd=workdir)
    assert f"resumed from step {step} of {MAX_STEPS}" in out.stdout
    cli(*_args(case, reference), cwd=workdir)
    last = f"step-{MAX_STEPS:08d}"
    diff = max_abs_diff(resumed / "checkpoints" / last / "trainable.safetensors",
                        reference / "checkpoints" / last / "trainable.safetensors")
    assert diff <= 1e-6
    got = json.loads((resumed / "metrics.json").read_text(encoding="utf-8"))["eval"]
    ref = json.loads((reference / "metrics.json").read_text(encoding="utf-8"))["eval"]
    assert got == pytest.approx(ref, abs=1e-6)
