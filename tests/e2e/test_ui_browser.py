"""`tuneforge ui` in a real browser: headless Chromium from the system (Debian's ``chromium`` package) driven
by Playwright, against ``tuneforge ui`` started as a user starts it, over a runs folder made by tiny
training runs. The runs list shows them, a run page draws its curves, the form refuses a bad value on the
field, a run launched from the form appears, trains live and finishes, and chat returns text.

Screenshots go to ``docs/ui/`` (override with ``TUNEFORGE_UI_SHOTS=DIR``). Playwright never downloads a
browser here: it is pointed at the system chromium, and the test skips (saying why) when there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("TUNEFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system chromium (apt-get install -y chromium): the browser test drives the system browser and "
                "never downloads one", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (it drives the system chromium)")
httpx = pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ui_support import make_runs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("TUNEFORGE_UI_SHOTS", REPO / "docs" / "ui"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    made = make_runs(tmp_path_factory.mktemp("uib"))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (made["root"] / "ui.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "ui", "--runs", "runs", "--port", str(port),
                             "--device", "cpu"], cwd=made["root"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(url + "/api/runs", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("tuneforge ui did not start:\n" + (made["root"] / "ui.log").read_text())
    yield url, made
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def page(server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1360, "height": 1000})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors
        yield pg
        browser.close()
    assert not errors, errors  # no script error on any page


def test_runs_list_shows_the_runs(server, page) -> None:
    url, _ = server
    page.goto(url + "/")
    rows = page.locator("table#runs tbody tr")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.run)")) == ["bert", "llama"]
    assert page.locator("tr[data-run='bert'] .status").inner_text() == "finished"
    page.screenshot(path=str(SHOTS / "runs-list.png"))


def test_a_run_page_draws_its_curves(server, page) -> None:
    url, made = server
    page.goto(url + "/run/bert")
    page.wait_for_selector("#chart-loss .uplot canvas")
    records = [json.loads(line) for line in (made["runs"] / "bert" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    eval_steps = [r["step"] for r in records if r["split"] == "eval"]
    drawn = page.evaluate("() => ['chart-loss', 'chart-eval', 'chart-lr'].map(id => document.getElementById(id)._u.data)")
    assert drawn[0][0] == sorted(set(train_steps) | set(eval_steps))  # x: every logged step
    assert [y for y in drawn[0][1] if y is not None] == [r["loss"] for r in records if r["split"] == "train"]
    assert drawn[1][0] == eval_steps and drawn[2][0] == train_steps
    assert page.locator("#chart-loss canvas").bounding_box()["width"] > 300
    page.screenshot(path=str(SHOTS / "run-page.png"), full_page=True)


def test_the_form_refuses_a_bad_value_on_the_field(server, page) -> None:
    url, _ = server
    page.goto(url + "/new")
    page.fill("[name='model.name']", "tiny-bert")
    page.fill("[name='train.batch_size']", "abc")
    page.fill("[name='train.warmup_ratio']", "2")
    page.click("#start")
    page.wait_for_selector(".field.invalid")
    bad = page.locator(".field.invalid[data-input='train.batch_size'] .error")
    assert "valid integer" in bad.inner_text()
    assert "less than 1" in page.locator(".field.invalid[data-input='train.warmup_ratio'] .error").inner_text()
    assert page.input_value("[name='train.batch_size']") == "abc"  # what the user typed is kept
    assert page.url.endswith("/new") and "Start training" in page.content()
    page.locator("[data-input='train.batch_size']").scroll_into_view_if_needed()
    page.evaluate("() => window.scrollBy(0, -250)")
    page.screenshot(path=str(SHOTS / "new-run-form.png"))
    # the Check button asks the same validation without starting anything
    page.fill("[name='train.batch_size']", "8")
    page.click("#check")
    page.wait_for_function("() => !document.querySelector(\".field.invalid[data-input='train.batch_size']\")")
    assert page.locator(".field.invalid[data-input='train.warmup_ratio']").count() == 1


def test_a_run_launched_from_the_form_trains_live_and_finishes(server, page) -> None:
    url, made = server
    page.goto(url + "/new")
    values = {"model.name": "tiny-bert", "data.train": str(made["train"]), "data.validation": str(made["val"]),
              "train.max_steps": "300", "train.batch_size": "8", "train.log_steps": "5", "train.eval_steps": "60",
              "train.save_steps": "150", "train.lr": "1e-3", "output_dir": "runs/from-the-form"}
    for name, value in values.items():
        page.fill(f"[name='{name}']", value)
    page.select_option("[name='train.tensorboard']", "false")
    page.select_option("[name='train.precision']", "fp32")
    page.click("#start")
    page.wait_for_url("**/run/from-the-form")
    page.wait_for_function("() => document.getElementById('chart-loss')._u?.data[0].length >= 4", timeout=120_000)
    live = page.locator("#status").inner_text()
    page.screenshot(path=str(SHOTS / "run-live.png"))
    assert live in ("running", "finished")
    page.wait_for_function("() => document.getElementById('status').textContent === 'finished'", timeout=240_000)
    page.wait_for_selector("h2:has-text('Final metrics')")
    config = (made["runs"] / "from-the-form" / "config.yaml").read_text()
    assert "max_steps: 300" in config and "name: tiny-bert" in config
    page.goto(url + "/")
    assert page.locator("tr[data-run='from-the-form'] .status").inner_text() == "finished"


def test_chat_returns_text(server, page) -> None:
    url, _ = server
    page.goto(url + "/run/llama")
    page.click("#try-load")
    page.wait_for_selector("#try-chat:not([hidden])", timeout=120_000)
    page.fill("#chat-input", "say cat")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".msg.assistant.done", timeout=120_000)
    said = page.locator(".msg.assistant.done span").inner_text()
    assert said.strip() and not said.startswith("error")
    # the same request answered whole by the embedded `tuneforge serve` routes (greedy): the same text
    whole = httpx.post(url + "/serve/v1/chat/completions", json={"model": "llama", "max_tokens": 64, "messages": [
        {"role": "user", "content": "say cat"}]}, timeout=60).json()
    assert whole["choices"][0]["message"]["content"] == said
    page.screenshot(path=str(SHOTS / "try-chat.png"))


def test_compare_overlays_two_runs(server, page) -> None:
    url, _ = server
    page.goto(url + "/")
    page.check("tr[data-run='bert'] input[type=checkbox]")
    page.check("tr[data-run='llama'] input[type=checkbox]")
    page.click("text=Compare selected")
    page.wait_for_selector("#chart-loss .uplot canvas")
    assert page.evaluate("() => document.getElementById('chart-loss')._u.series.length") == 3  # x + two runs
    assert page.locator("#config-diff tr.differs").count() > 3
    page.check("#only-diff")
    assert page.locator("#config-diff tr.same").first.is_hidden()
    page.screenshot(path=str(SHOTS / "compare.png"), full_page=False)
