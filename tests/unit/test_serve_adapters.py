"""Adapters at run time on a live server: hot load and unload while requests run, LRU eviction past
``max_loaded``, and refusals with the reason (another base, a missing path, a taken name, a method that
saves a whole model). Three tiny LoRA runs on tiny-llama and one on tiny-gpt2 (the wrong base)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from serve_support import live_server, train_clm, train_sft  # noqa: E402

from tuneforge.serve import ServeSettings, build_pool, create_app  # noqa: E402

N = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve-adapters")
    return {"a": train_sft(tmp, "a", "alpha", steps=4), "b": train_clm(tmp, "b", steps=4),
            "c": train_sft(tmp, "c", "gamma", steps=4), "gpt2": train_clm(tmp, "gpt2", steps=2, model="tiny-gpt2"),
            "full": train_sft(tmp, "full", "delta", steps=2, extra=("method=full",))}


def _reply(url: str, model: str, prompt: str = "say cat") -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": N})


def _names(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}


def test_hot_load_and_unload_while_requests_run(runs: dict[str, Path]) -> None:
    settings = ServeSettings(max_loaded=4)
    pool = build_pool(["tiny-llama"], [f"a={runs['a']}"], settings)
    with live_server(create_app(pool, settings)) as url:
        want_a = _reply(url, "a").json()["choices"][0]["message"]["content"]

        def load_use_unload() -> str:
            r = httpx.post(url + "/v1/adapters", json={"name": "c", "path": str(runs["c"])}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["parent"] == "tiny-llama"
            text = _reply(url, "c").json()["choices"][0]["message"]["content"]
            assert httpx.delete(url + "/v1/adapters/c", timeout=60).json() == {"id": "c", "object": "adapter",
                                                                              "deleted": True}
            return text

        with ThreadPoolExecutor(6) as ex:
            during = [ex.submit(_reply, url, "a") for _ in range(10)]
            c_text = ex.submit(load_use_unload).result()
            replies = [f.result() for f in during]
        assert all(r.status_code == 200 for r in replies)
        assert {r.json()["choices"][0]["message"]["content"] for r in replies} == {want_a}
        assert c_text != want_a
        assert "c" not in _names(url)
        assert _reply(url, "c").status_code == 404
        assert _reply(url, "a").json()["choices"][0]["message"]["content"] == want_a  # a survives c's unload

        # unloading the last adapter leaves the plain base, which still serves and takes new adapters
        base = _reply(url, "tiny-llama").status_code
        assert httpx.delete(url + "/v1/adapters/a").status_code == 200
        assert _names(url) == {"tiny-llama"} and base == 400  # tiny-llama has no chat template
        assert httpx.post(url + "/v1/adapters", json={"name": "a2", "path": str(runs["a"])}).status_code == 200
        assert _reply(url, "a2").json()["choices"][0]["message"]["content"] == want_a


def test_least_recently_used_adapter_is_evicted(runs: dict[str, Path]) -> None:
    settings = ServeSettings(max_loaded=2)
    pool = build_pool(["tiny-llama"], [f"a={runs['a']}", f"c={runs['c']}"], settings)
    with live_server(create_app(pool, settings)) as url:
        assert _reply(url, "c").status_code == 200
        assert _reply(url, "a").status_code == 200  # c is now the least recently used
        r = httpx.post(url + "/v1/adapters", json={"name": "b", "path": str(runs["b"])}, timeout=60)
        assert r.status_code == 200, r.text
        assert _names(url) == {"tiny-llama", "a", "b"}
        err = _reply(url, "c").json()["error"]
        assert err["code"] == "model_not_found"
        assert "tuneforge_adapter_evictions_total 1" in httpx.get(url + "/metrics").text


def test_refusals_name_the_reason(runs: dict[str, Path]) -> None:
    settings = ServeSettings(max_loaded=4)
    pool = build_pool(["tiny-llama"], [f"a={runs['a']}"], settings)
    with live_server(create_app(pool, settings)) as url:
        def load(name: str, path: Path | str) -> dict[str, Any]:
            r = httpx.post(url + "/v1/adapters", json={"name": name, "path": str(path)}, timeout=60)
            assert 400 <= r.status_code < 500, r.text
            return {"status": r.status_code, **r.json()["error"]}

        other = load("g", runs["gpt2"])
        assert other["status"] == 400 and other["code"] == "base_mismatch" and "trained on the base" in other["message"]
        full = load("f", runs["full"])
        assert full["code"] == "not_an_adapter" and "whole model" in full["message"]
        assert load("x", "/no/such/run")["code"] == "adapter_not_found"
        assert load("a", runs["c"])["status"] == 409
        assert load("bad name!", runs["c"])["param"] == "name"
        assert _names(url) == {"tiny-llama", "a"}


def test_an_adapter_alone_loads_its_base(runs: dict[str, Path]) -> None:
    pool = build_pool([], [f"b={runs['b']}"], ServeSettings())
    cards = {c.id: c for c in pool.cards()}
    assert cards["b"].parent == "tiny-llama" and "tiny-llama" in cards  # named as the registry knows it
