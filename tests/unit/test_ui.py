"""`tuneforge ui` pages and endpoints (FastAPI TestClient) against a runs folder made by tiny training runs:
runs list, run page, live metrics polling, overlays and config diff, tables, files, try it (through the
server's own routes), and the refusals (paths outside the runs folder, foreign hosts, missing tokens)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")
from fastapi.testclient import TestClient
from markupsafe import escape

from tuneforge.track import read_metrics
from tuneforge.ui import create_app
from tuneforge.ui.runs import RunsFolder, read_metrics_from
from ui_support import make_runs

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_runs(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def client(made: dict[str, Path]):
    app = create_app(made["runs"], cwd=made["root"], device="cpu")
    with TestClient(app, base_url=BASE) as c:
        c.token = app.state.token
        yield c


def _final(made: dict[str, Path], run: str) -> dict:
    return json.loads((made["runs"] / run / "metrics.json").read_text())


def test_runs_list_shows_each_run_with_status_and_best_metric(client, made) -> None:
    html = client.get("/").text
    for run in ("bert", "llama", "compare-demo/"):
        assert run in html or run.endswith("/")
    rows = {r["id"]: r for r in client.get("/api/runs").json()}
    assert set(rows) == {"bert", "llama"}
    bert, llama = rows["bert"], rows["llama"]
    assert (bert["task"], bert["method"], bert["model"], bert["status"]) == ("classification", "full", "tiny-bert",
                                                                             "finished")
    assert (llama["task"], llama["method"], llama["model"], llama["status"]) == ("sft", "lora", "tiny-llama",
                                                                                 "finished")
    train = _final(made, "bert")["train"]
    assert bert["best"] == pytest.approx(train["best_metric"]) and bert["best_step"] == train["best_step"]
    assert bert["metric"] == "accuracy" and bert["step"] == 8
    assert llama["metric"] == "loss" and llama["best"] == pytest.approx(_final(made, "llama")["train"]["best_metric"])
    wall = re.search(r"\| wall time \| ([\d.]+) s", (made["runs"] / "bert" / "report.md").read_text()).group(1)
    assert bert["wall_s"] == pytest.approx(float(wall))
    assert f'{train["best_metric"]:.4f}' in html


def test_run_page_has_curves_metrics_report_and_samples(client, made) -> None:
    html = client.get("/run/bert").text
    assert 'id="chart-loss"' in html and 'id="chart-eval"' in html and 'id="chart-lr"' in html
    val = _final(made, "bert")["splits"]["validation"]
    assert f"{val['accuracy']:.4f}" in html and f"{val['macro_f1']:.4f}" in html
    assert "<table>" in html and "/files/bert/plots/loss.png" in html  # the report, its images pointed at /files
    assert "model:\n  name: tiny-bert" in html  # config.yaml
    llama = client.get("/run/llama").text
    samples = _final(made, "llama")["samples"]["rows"]
    assert samples and "Before / after samples" in llama
    for row in samples:
        for text in (row["before"], row["after"]):
            assert str(escape(text)) in llama


def test_metrics_endpoint_reads_new_lines_only(client, made, tmp_path) -> None:
    whole = client.get("/api/metrics/bert").json()
    assert whole["records"] == read_metrics(made["runs"] / "bert") and whole["status"] == "finished"
    again = client.get(f"/api/metrics/bert?offset={whole['offset']}").json()
    assert again["records"] == [] and again["offset"] == whole["offset"]
    # a file being written: only whole lines are read; a cut-back file (resume) starts over
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl')
    recs, off, reset = read_metrics_from(d)
    assert [r["step"] for r in recs] == [1] and not reset
    with (d / "metrics.jsonl").open("a") as f:
        f.write('it": "train", "loss": 1.5}\n')
    recs, off2, _ = read_metrics_from(d, off)
    assert [r["loss"] for r in recs] == [1.5] and off2 == (d / "metrics.jsonl").stat().st_size
    (d / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    recs, _, reset = read_metrics_from(d, off2)
    assert reset and [r["step"] for r in recs] == [1]


def test_compare_overlays_and_highlights_config_differences(client) -> None:
    html = client.get("/compare?run=bert&run=llama").text
    assert "TF.comparePage([\"bert\", \"llama\"])" in html
    rows = {key: kind for kind, key in re.findall(r'<tr class="(differs|same)"><th>([^<]+)</th>', html)}
    assert rows["task.name"] == "differs" and rows["model.name"] == "differs" and rows["method.name"] == "differs"
    assert rows["train.batch_size"] == "same" and rows["train.seed"] == "same"
    assert rows["task.template"] == "differs"  # a key only one run has


def test_tables_pages_render_compare_and_forgetting_outputs(client, made) -> None:
    html = client.get("/tables").text
    assert "/table/compare-demo" in html and "/table/forgetting-demo" in html
    comp = client.get("/table/compare-demo").text
    assert "<table>" in comp and "0.6100" in comp and "lora" in comp and "/files/compare-demo/compare.png" in comp
    forg = client.get("/table/forgetting-demo").text
    assert "-0.0400" in forg and "/files/forgetting-demo/forgetting_table.png" in forg
    png = client.get("/files/compare-demo/compare.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/table/bert").status_code == 404


@pytest.mark.parametrize("url", [
    "/run/../data", "/run/%2e%2e/data", "/run/..%2Fdata", "/run//etc", "/run/%2Fetc", "/api/metrics/..%2F..%2Fetc",
    "/files/..%2Fdata%2Ftrain.csv", "/files/%2e%2e/data/train.csv", "/files/bert/../../data/train.csv",
    "/files/.tuneforge-ui/x.log", "/files/bert/model/model.safetensors", "/compare?run=bert&run=..%2Fdata",
    "/run/escape", "/files/escape/secret.txt", "/table/..%2Fdata", "/run/nonexistent"])
def test_paths_outside_the_runs_folder_are_refused(client, made, url) -> None:
    link = made["runs"] / "escape"
    if not link.exists():
        outside = made["root"] / "outside"
        outside.mkdir(exist_ok=True)
        (outside / "config.yaml").write_text("model: tiny-bert\n")
        (outside / "secret.txt").write_text("s3cr3t-content")
        link.symlink_to(outside, target_is_directory=True)
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code)
    assert "s3cr3t-content" not in r.text and "text,label" not in r.text
    folder = RunsFolder(made["runs"])
    with pytest.raises(ValueError):
        folder.resolve("escape/secret.txt")


def test_foreign_hosts_tokens_and_headers_are_refused(client, made) -> None:
    evil = TestClient(client.app, base_url="http://evil.example")
    assert evil.get("/").status_code == 400  # DNS rebinding: only loopback names
    assert client.post("/new", data={"model.name": "tiny-bert"}).status_code == 403  # no form token
    assert client.post("/api/stop/bert", data={"_token": "wrong"}).status_code == 403
    assert client.post("/api/try/llama").status_code == 403  # JSON posts need the custom header
    assert client.post("/api/stop/bert", data={"_token": client.token}).status_code == 409  # not running


def test_try_it_chats_and_classifies_through_the_server_routes(client, made) -> None:
    from tuneforge.generation import GenerationOptions, generate, load_model
    from tuneforge.inference import predict_texts

    info = client.post("/api/try/llama", headers={"X-Tuneforge-UI": "1"}).json()
    assert info == {"model": "llama", "kind": "generative", "task": None, "route": "chat"}
    body = {"model": "llama", "messages": [{"role": "user", "content": "say cat"}], "max_tokens": 6}
    with client.stream("POST", "/serve/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    loaded = load_model(made["runs"] / "llama")
    expected = generate(loaded.model, loaded.tokenizer, ["say cat"], GenerationOptions(max_new_tokens=6), chat=True)[0]
    assert streamed == expected and streamed.strip()

    info = client.post("/api/try/bert", headers={"X-Tuneforge-UI": "1"}).json()
    assert info["route"] == "classify"
    got = client.post("/serve/v1/classify", json={"model": "bert", "input": ["great movie"]}).json()["data"][0]
    want = predict_texts(made["runs"] / "bert", ["great movie"], None, [], None)[0]
    assert got["label"] == want["label"]
    assert got["probabilities"]["positive"] == pytest.approx(want["p_positive"], abs=1e-5)
    assert client.post("/api/try/compare-demo", headers={"X-Tuneforge-UI": "1"}).status_code == 404


def test_ui_command_is_registered_and_binds_loopback_by_default() -> None:
    from typer.testing import CliRunner

    from tuneforge.cli import app

    out = CliRunner().invoke(app, ["ui", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--runs" in out.output and "--port" in out.output
    assert "127.0.0.1" in out.output and "7860" in out.output
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_a_new_run_can_start_from_a_runs_config(client, made) -> None:
    html = client.get("/new?recipe=run:bert").text
    assert 'value="tiny-bert"' in html and "the config of run bert" in html
    form = {"_token": client.token, "_recipe": "run:bert", "train.seed": "5"}
    refused = client.post("/api/validate", data=form).json()  # its output_dir is the old run's
    assert "exists and is not empty" in refused["errors"]["output_dir"]
    ok = client.post("/api/validate", data={**form, "output_dir": str(made["runs"] / "bert-2")}).json()
    assert ok["ok"] and ok["command"].startswith("tuneforge train runs/bert/config.yaml train.seed=5 output_dir=")
    assert "seed: 5" in ok["config"] and "name: tiny-bert" in ok["config"]
    assert client.get("/new?recipe=run:../data").status_code == 404
    assert client.get("/new?recipe=../../etc/passwd").status_code == 404
