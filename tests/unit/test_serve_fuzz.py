"""The server against its own OpenAPI schema with ``schemathesis`` (bounded examples per operation, valid
and invalid bodies): no 5xx, every error a JSON object in the OpenAI error shape; plus a hand-written
list of malformed bodies and headers, after which the server still answers."""

from __future__ import annotations

import re
from typing import Any

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from tuneforge.serve import ModelPool, ServeSettings, create_app  # noqa: E402

KEY = "fuzz-key"
SETTINGS = ServeSettings(api_key=KEY, max_tokens_cap=4, default_max_tokens=4, max_prompt_tokens=64, max_n=2,
                         max_inputs=4, max_body_bytes=50_000, batch_window_ms=0)


# The app is made at import with an empty pool (cheap: schemathesis needs it to build the tests); the
# models are loaded into that pool by the module fixture, when a test of this module first runs.
POOL = ModelPool(max_loaded=SETTINGS.max_loaded, device="cpu")
APP = create_app(POOL, SETTINGS)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _models() -> None:
    if not POOL.names():
        POOL.add_model("tiny-llama")
        POOL.add_model("tiny-bert")
        # a minimal chat template, so fuzzed chat bodies reach generation instead of stopping at "no template"
        POOL.get("tiny-llama").tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


def _check(status: int, body: Any) -> None:
    assert status < 500, body
    if status >= 400:
        assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "param", "code"}, body


def _fuzz_one(case: Any) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and len(case.body) % 2:
        # about half the bodies name a served model, so generation and embedding run on fuzzed fields
        case.body["model"] = "tiny-bert" if case.path in ("/v1/classify", "/v1/tag", "/v1/answer") else "tiny-llama"
        for key, top in (("max_tokens", 4), ("n", 2)):  # within the caps (beyond them is a 400, tested elsewhere)
            if isinstance(case.body.get(key), int) and not isinstance(case.body[key], bool):
                case.body[key] = 1 + abs(case.body[key]) % top
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    try:
        body = response.json()
    except ValueError:  # streams (text/event-stream) and /metrics (text) are not JSON
        body = None
    _check(response.status_code, body)


def _fuzz_test(method: str, path: str) -> Any:
    @schema.include(method=method, path=path).parametrize()
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def test(case: Any) -> None:
        _fuzz_one(case)

    return test


# One test function per operation, named after it: `schema.parametrize()` over the whole schema gives every
# operation the same test id, and pytest-xdist (`make test` runs two workers) schedules by id, so it ran one
# of them. Each test runs schemathesis' phases (examples, coverage, fuzzing with valid and invalid data).
for _op in schema.get_all_operations():
    _method, _path = _op.ok().method.upper(), _op.ok().path
    _name = "test_schema_fuzz_never_5xx_" + "_".join(filter(None, re.split(r"[^a-z0-9]+", f"{_method} {_path}".lower())))
    assert _name not in globals(), f"two operations map to the test name {_name}"
    globals()[_name] = _fuzz_test(_method, _path)


MALFORMED: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("POST", "/v1/chat/completions", b"", {}),
    ("POST", "/v1/chat/completions", b"null", {}),
    ("POST", "/v1/chat/completions", b"\xff\xfe\x00", {}),
    ("POST", "/v1/chat/completions", b'{"model": "tiny-llama", "messages": "hi"}', {}),
    ("POST", "/v1/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user"}]}', {}),
    ("POST", "/v1/chat/completions", b'{"model": "tiny-llama", "messages": [{"role": "user", "content": 5}]}', {}),
    ("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": "", "max_tokens": 2}', {}),
    ("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": "x", "max_tokens": -1}', {}),
    ("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": "x", "seed": -5}', {}),
    ("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": "x", "top_p": 0}', {}),
    ("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": "' + b"w " * 2000 + b'"}', {}),
    ("POST", "/v1/completions", b'{"model": "tiny-bert", "prompt": "x"}', {}),
    ("POST", "/v1/embeddings", b'{"model": "tiny-bert", "input": ["a", ""]}', {}),
    ("POST", "/v1/embeddings", b'{"model": "tiny-bert", "input": ["a","b","c","d","e"]}', {}),
    ("POST", "/v1/embeddings", b'{"model": "tiny-bert", "input": "' + b"w " * 2000 + b'"}', {}),
    ("POST", "/v1/answer", b'{"model": "tiny-bert", "input": {"question": "q"}}', {}),
    ("POST", "/v1/tag", b'{"model": "tiny-llama", "input": "x"}', {}),
    ("POST", "/v1/adapters", b'{"name": "x", "path": "/etc"}', {}),
    ("POST", "/v1/adapters", b'{"name": "x", "path": "tiny-llama"}', {}),
    ("DELETE", "/v1/adapters/nope", b"", {}),
    ("POST", "/v1/chat/completions", b"{}", {"content-length": "99999999"}),
    ("POST", "/v1/chat/completions", b"{}", {"content-type": "text/plain"}),
    ("GET", "/v1/models", b"", {"authorization": "Bearer"}),
    ("GET", "/v1/models", b"", {"authorization": "Basic Zm9vOmJhcg=="}),
]


@pytest.mark.parametrize(("method", "path", "body", "headers"), MALFORMED, ids=[f"{m[0]} {m[1]} #{i}"
                                                                                for i, m in enumerate(MALFORMED)])
def test_malformed_requests_are_4xx(method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
    client = TestClient(APP, raise_server_exceptions=False)
    h = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **headers}
    if "content-length" in headers:  # a declared size over the limit is refused before reading
        r = client.request(method, path, content=body, headers=h)
        assert r.status_code == 413
        return
    r = client.request(method, path, content=body, headers=h)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _check(r.status_code, r.json())
    assert client.get("/health").json()["status"] == "ok"
