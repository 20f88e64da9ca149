"""Multi-task runs on tiny-bert: classification + NER (+ QA) over one shared backbone.

* every registered method trains a multi-task run, saves one folder, and `evaluate_file --task` on the saved
  run reproduces each task's final validation metrics (methods adding virtual tokens are refused by config);
* the backbone is one module shared by every head and stored once;
* ``merge --task`` writes one task as a plain transformers folder whose logits equal the multi-task model's;
* bad configs name their key.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from test_extractive_qa import synthetic_rows
from test_extractive_qa import write_jsonl as write_qa
from test_token_classification import make_sentences, write_conll, write_jsonl

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.inference import evaluate_file, predict_texts
from tuneforge.methods import METHODS, get_method
from tuneforge.pipeline import train

STEPS = 4
WORDS = ["good", "great", "fine", "bad", "awful", "poor"]

REFUSED_BY_CONFIG = {m for m in METHODS if get_method(m).config.virtual_tokens}
REFUSED_AT_APPLY = {"frozen": "has no feature cache; set method.cache_features=false"}
EXTRA: dict[str, list[str]] = {"frozen-nocache": ["method=frozen", "method.cache_features=false"]}
CASES = sorted(METHODS) + sorted(EXTRA)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneforge.pipeline.write_plots", lambda run_dir: None)


def write_sentiment(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(5)]
            w.writerow([" ".join(words), "pos" if sum(x in WORDS[:3] for x in words) >= 3 else "neg"])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multitask")
    rows = make_sentences(40, seed=2)
    qa = synthetic_rows(24, seed=1)
    return {
        "cls_train": write_sentiment(root / "cls-train.csv", 40, 0), "cls_val": write_sentiment(root / "cls-val.csv", 16, 1),
        "ner_train": write_conll(root / "ner.train", rows[:24]), "ner_val": write_jsonl(root / "ner-val.jsonl", rows[24:]),
        "qa_train": write_qa(root / "qa-train.jsonl", qa[:16]), "qa_val": write_qa(root / "qa-val.jsonl", qa[16:]),
    }


def overrides(files: dict[str, Path], out: Path, *extra: str, qa: bool = False) -> list[str]:
    tasks = [("cls", "classification"), ("ner", "token_classification")] + ([("qa", "extractive_qa")] if qa else [])
    blocks = [o for name, task in tasks for o in (
        f"task.tasks.{name}.task={task}", f"task.tasks.{name}.data.train={files[name + '_train']}",
        f"task.tasks.{name}.data.validation={files[name + '_val']}")]
    return ["model=tiny-bert", "task=multitask", *blocks, "train.batch_size=8", f"train.max_steps={STEPS}",
            "train.log_steps=1", "train.warmup_steps=0", "train.schedule=constant", "train.precision=fp32",
            "train.tensorboard=false", "train.seed=0", f"output_dir={out}", *extra]


@pytest.mark.parametrize("case", CASES)
def test_every_method_trains_saves_and_reevaluates_each_task(case: str, files: dict[str, Path], tmp_path: Path) -> None:
    method = EXTRA.get(case, [f"method={case}"])
    name = method[0].split("=", 1)[1]
    args = overrides(files, tmp_path / "run", *method, f"train.lr={max(get_method(name).config.default_lr, 5e-3)}")
    if case in REFUSED_BY_CONFIG:
        with pytest.raises(ConfigError, match="adds virtual tokens") as info:
            load_config(None, args)
        assert info.value.key == "method.name"
        return
    run = load_config(None, args)
    if case in REFUSED_AT_APPLY:
        with pytest.raises(ConfigError, match=REFUSED_AT_APPLY[case]):
            train(run, quiet=True)
        return
    res = train(run, quiet=True)
    assert res.metrics["train"]["steps"] == STEPS
    final = res.metrics["splits"]["validation"]
    assert final["score"] == pytest.approx((final["cls/accuracy"] + final["ner/f1"]) / 2)
    assert set(final["per_task"]) == {"cls", "ner"}
    for task, key in (("cls", "accuracy"), ("ner", "f1")):
        flat = evaluate_file(tmp_path / "run", files[f"{task}_val"], [], task)
        assert flat[key] == pytest.approx(final[f"{task}/{key}"], abs=1e-6)
        assert flat["loss"] == pytest.approx(final[f"{task}/loss"], rel=1e-4, abs=1e-5)


def test_shared_backbone_is_one_module_stored_once(files: dict[str, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    from tuneforge.engine import Runtime
    from tuneforge.objectives import get_objective
    from tuneforge.wiring import wire

    run = load_config(None, overrides(files, tmp_path / "run", "train.lr=1e-2", qa=True))
    res = train(run, quiet=True)
    objective = get_objective(run)
    model = objective.from_saved(res.run_dir / "model").model
    assert model.heads["cls"].bert is model.bert and model.heads["ner"].bert is model.bert
    with safe_open(str(res.run_dir / "model" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("word_embeddings.weight") for k in keys) == 1
    assert {k.split(".")[1] for k in keys if k.startswith("heads.")} == {"cls", "ner", "qa"}
    # QA's percent F1 counts as a fraction in the mean score
    final = res.metrics["splits"]["validation"]
    assert final["score"] == pytest.approx((final["cls/accuracy"] + final["ner/f1"] + final["qa/f1"] / 100) / 3)
    # trainable counts: one backbone plus three small heads
    from tuneforge.models.registry import resolve_model

    data = objective.load_data(run)
    wired = wire(run, objective, data, resolve_model("tiny-bert"), Runtime.cpu(), 2)
    backbone = sum(p.numel() for p in wired.model.bert.parameters())
    heads = sum(p.numel() for p in wired.model.heads.parameters())
    assert wired.total == backbone + heads


def test_merge_task_writes_a_plain_transformers_model_with_equal_logits(files: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    from tuneforge.export import merge_run
    from tuneforge.objectives import get_objective

    out = tmp_path / "run"
    run = load_config(None, overrides(files, out, "method=lora", "train.lr=1e-2"))
    train(run, quiet=True)
    res = merge_run(out, tmp_path / "ner-only", task="ner")
    assert res.kind == "task" and res.max_abs_diff < 1e-5
    plain = AutoModelForTokenClassification.from_pretrained(tmp_path / "ner-only").eval()
    multi = get_objective(load_config(out / "config.yaml", ["task.select=ner"])).from_saved(out / "model").model
    ids = torch.tensor([[2, 15, 27, 31, 3]])
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = multi(input_ids=ids, task="ner").logits
    assert float((a - b).abs().max()) < 1e-5
    # the exported folder is an ordinary NER run: eval without --task gives the multi-task run's figures
    single = evaluate_file(tmp_path / "ner-only", files["ner_val"], [])
    assert single["f1"] == pytest.approx(evaluate_file(out, files["ner_val"], [], "ner")["f1"], abs=1e-6)


def test_predict_and_eval_need_a_task(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, overrides(files, out, "train.lr=1e-2")), quiet=True)
    with pytest.raises(ConfigError, match=r"pass --task NAME \(tasks: cls, ner\)"):
        predict_texts(out, ["good great fine"], None, [])
    with pytest.raises(ConfigError, match="'qa' is not a task of this run; tasks: cls, ner"):
        predict_texts(out, ["good great fine"], None, [], "qa")
    rows = predict_texts(out, ["good great fine bad awful"], None, [], "cls")
    assert rows[0]["label"] in ("pos", "neg")
    tags = predict_texts(out, ["Alice visited Paris"], None, [], "ner")
    assert len(tags[0]["tags"]) == 3


@pytest.mark.parametrize(("extra", "key", "message"), [
    (["task.tasks.ner.task=clm"], "task", "'clm' has no task head"),
    (["data.train=x.csv"], "data.train", "each task reads its own data block"),
    (["task.select=zzz"], "task", "'zzz' is not a task of this run"),
    (["task.general_eval=x.csv"], "task.general_eval", "not supported by multi-task runs yet"),
    (["retain.replay.data=x.csv"], "retain.replay", "not supported by multi-task runs yet"),
    (["task.tasks.ner.data.max_length=4"], "task.tasks.ner.data.max_length", "greater than or equal to 8"),
])
def test_bad_configs_name_the_key(files: dict[str, Path], tmp_path: Path, extra: list[str], key: str,
                                  message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides(files, tmp_path / "run", *extra))
    assert info.value.key.startswith(key)


def test_one_task_is_refused_and_names_must_be_identifiers(files: dict[str, Path]) -> None:
    one = ["task=multitask", "task.tasks.cls.task=classification", f"task.tasks.cls.data.train={files['cls_train']}"]
    with pytest.raises(ConfigError, match="two or more tasks"):
        load_config(None, one)
    with pytest.raises(ConfigError, match="is not a task name"):
        _validate({"task": {"name": "multitask", "tasks": {
            "1st": {"task": "classification"}, "b": {"task": "classification"}}}})


def test_single_task_run_refuses_task_option(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "single"
    run = load_config(None, ["model=tiny-bert", f"data.train={files['cls_train']}", f"data.validation={files['cls_val']}",
                             "train.max_steps=1", "train.tensorboard=false", f"output_dir={out}"])
    train(run, quiet=True)
    with pytest.raises(ConfigError, match="single-task 'classification' run"):
        evaluate_file(out, files["cls_val"], [], "cls")


def _validate(tree: dict) -> None:
    from pydantic import ValidationError

    from tuneforge.config.loading import _format_validation_error
    from tuneforge.config.schema import RunConfig

    try:
        RunConfig.model_validate(tree)
    except ValidationError as e:
        raise _format_validation_error(e, tree) from None
