"""Task routes for encoder runs on a live server: ``/v1/classify``, ``/v1/tag`` and ``/v1/answer`` answer
exactly what ``tuneforge predict`` (`tuneforge.inference.predict_texts`) gives on the same run (tiny-bert
runs trained a few steps), each route refuses a run of another task, and an encoder gives embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
import httpx
from serve_support import live_server

from tuneforge.config import load_config
from tuneforge.inference import predict_texts
from tuneforge.pipeline import train
from tuneforge.serve import ServeSettings, build_pool, create_app

COMMON = ["model=tiny-bert", "train.max_steps=3", "train.batch_size=8", "train.precision=fp32",
          "train.tensorboard=false", "train.eval_on_start=false"]


def _run(tmp: Path, name: str, *extra: str) -> Path:
    import tuneforge.pipeline as pipeline

    real, pipeline.write_plots = pipeline.write_plots, lambda run_dir: None
    try:
        return train(load_config(None, [*COMMON, *extra, f"output_dir={tmp / name}"]), quiet=True).run_dir
    finally:
        pipeline.write_plots = real


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("serve-tasks")
    cls = tmp / "cls.csv"
    cls.write_text("text,label\n" + "".join(f"{w} movie {i},{lab}\n" for i in range(8)
                                             for w, lab in (("great", "pos"), ("awful", "neg"))))
    ner = tmp / "ner.jsonl"
    ner.write_text("".join(json.dumps({"tokens": [p, "lives", "in", c], "tags": ["B-PER", "O", "O", "B-LOC"]}) + "\n"
                           for p in ("anna", "bob", "carl", "dina") for c in ("paris", "rome", "oslo")))
    qa = tmp / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": "which city ?", "context": f"the city is {c} .",
                                      "answers": {"text": [c], "answer_start": [12]}}) + "\n"
                          for i, c in enumerate(["paris", "rome", "oslo", "lima"] * 4)))
    sts = tmp / "sts.csv"
    sts.write_text("s1,s2,score\n" + "".join(f"{a} movie,{b} film,{float(a == b)}\n" for a in ("great", "awful")
                                               for b in ("great", "awful") for _ in range(4)))
    runs = {
        "sts": _run(tmp, "sts", "task=contrastive", f"data.train={sts}", "data.text_column=s1",
                    "data.text_pair_column=s2", "data.label_column=score", "task.pooling=cls"),
        "cls": _run(tmp, "cls", "task=classification", f"data.train={cls}"),
        "ner": _run(tmp, "ner", "task=token_classification", f"data.train={ner}"),
        "qa": _run(tmp, "qa", "task=extractive_qa", f"data.train={qa}", "task.max_length=64", "task.doc_stride=16",
                   "task.max_question_length=16"),
    }
    settings = ServeSettings(max_inputs=8)
    pool = build_pool([f"cls={runs['cls']}", f"ner={runs['ner']}", f"qa={runs['qa']}", f"sts={runs['sts']}",
                       "tiny-bert"], [], settings)
    with live_server(create_app(pool, settings)) as url:
        yield url, runs


def test_classify_equals_predict(server: Any) -> None:
    url, runs = server
    texts = ["great movie 1", "awful movie 3"]
    r = httpx.post(url + "/v1/classify", json={"model": "cls", "input": texts}).json()
    want = predict_texts(runs["cls"], texts, None, [])
    assert [d["label"] for d in r["data"]] == [w["label"] for w in want]
    for d, w in zip(r["data"], want, strict=True):
        assert d["probabilities"] == {k.removeprefix("p_"): v for k, v in w.items() if k.startswith("p_")}
        assert abs(sum(d["probabilities"].values()) - 1) < 1e-4


def test_tag_equals_predict(server: Any) -> None:
    url, runs = server
    texts = ["anna lives in rome", "zed lives in  oslo"]
    r = httpx.post(url + "/v1/tag", json={"model": "ner", "input": texts}).json()
    want = predict_texts(runs["ner"], texts, None, [])
    assert [{"tags": d["tags"], "entities": d["entities"]} for d in r["data"]] == \
        [{"tags": w["tags"], "entities": w["entities"]} for w in want]
    assert all(len(d["tags"]) == 4 for d in r["data"])


def test_answer_equals_predict(server: Any) -> None:
    url, runs = server
    items = [{"question": "which city ?", "context": "the city is rome ."}]
    r = httpx.post(url + "/v1/answer", json={"model": "qa", "input": items}).json()
    want = predict_texts(runs["qa"], ["which city ? ||| the city is rome ."], None, [])
    assert [(d["text"], d["start"], d["end"]) for d in r["data"]] == [(w["answer"], w["start"], w["end"]) for w in want]
    ctx = items[0]["context"]
    assert ctx[r["data"][0]["start"]:r["data"][0]["end"]] == r["data"][0]["text"]


def test_routes_refuse_runs_of_other_tasks_and_encoders_embed(server: Any) -> None:
    url, _ = server
    err = httpx.post(url + "/v1/classify", json={"model": "ner", "input": "x"}).json()["error"]
    assert err["code"] == "wrong_model_kind" and "cls" in err["message"]
    assert httpx.post(url + "/v1/tag", json={"model": "cls", "input": "x"}).status_code == 400
    assert httpx.post(url + "/v1/answer", json={"model": "cls", "input": {"question": "a", "context": "b"}}
                      ).status_code == 400
    assert httpx.post(url + "/v1/chat/completions", json={"model": "tiny-bert", "messages": [
        {"role": "user", "content": "hi"}]}).json()["error"]["code"] == "model_not_generative"
    assert httpx.post(url + "/v1/classify", json={"model": "cls", "input": ["a"] * 9}).status_code == 400
    emb = httpx.post(url + "/v1/embeddings", json={"model": "tiny-bert", "input": ["a b", "c"]}).json()
    assert len(emb["data"]) == 2 and len(emb["data"][0]["embedding"]) == 32
    emb = httpx.post(url + "/v1/embeddings", json={"model": "cls", "input": "a b"}).json()
    assert len(emb["data"][0]["embedding"]) == 32  # a task run's backbone embeds too


def test_a_sentence_encoder_run_embeds_with_its_own_pooling(server: Any, tmp_path: Path) -> None:
    import numpy as np

    from tuneforge.embedding import embed_file

    url, runs = server
    texts = ["great movie", "awful film here"]
    r = httpx.post(url + "/v1/embeddings", json={"model": "sts", "input": texts}).json()
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    embed_file(runs["sts"], tmp_path / "t.txt", tmp_path / "v.npy", [])
    want = np.load(tmp_path / "v.npy")  # [CLS] pooling, as the run was trained: not the mean
    got = np.array([d["embedding"] for d in r["data"]])
    assert np.abs(got - want).max() < 1e-5

