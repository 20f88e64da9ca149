"""`tuneforge serve` end to end with the official ``openai`` client against a live uvicorn server on
127.0.0.1 (a free port): tiny-llama as the base, a LoRA SFT run ("a", chat) and a LoRA CLM run ("b", raw
text) attached to it by name, and the merged SFT run served as a model of its own.

Asserted: /v1/models lists the adapters with their base as ``parent``; each adapter's greedy reply is
token for token ``tuneforge.generation``'s on that run, and the same as the merged model's; a streamed
reply concatenates to the plain one and ends ``data: [DONE]``; embeddings are the mean-pooled hidden
states (float and base64); errors are 4xx in the OpenAI shape (401 without the key, 404 for an unknown
model, 400/413 for malformed or oversized requests); concurrent requests mixing adapters are batched and
each gets its own adapter's output.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import torch  # noqa: E402
from serve_support import live_server, train_clm, train_sft  # noqa: E402

from tuneforge.generation import GenerationOptions, generate, load_model  # noqa: E402
from tuneforge.serve import ServeSettings, build_pool, create_app  # noqa: E402

KEY = "test-key-123"
PROMPTS = ["say cat", "say dog"]
N = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tuneforge.export.merge import merge_run

    tmp = tmp_path_factory.mktemp("serve")
    a = train_sft(tmp, "a", "alpha")
    b = train_clm(tmp, "b")
    merge_run(a, tmp / "a-merged")
    return {"a": a, "b": b, "merged": tmp / "a-merged"}


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]) -> Any:
    settings = ServeSettings(api_key=KEY, max_loaded=4, max_tokens_cap=64, max_prompt_tokens=200,
                             max_body_bytes=20_000, batch_window_ms=20)
    pool = build_pool(["tiny-llama", f"a-merged={runs['merged']}"], [f"a={runs['a']}", f"b={runs['b']}"], settings)
    app = create_app(pool, settings)
    with live_server(app) as url:
        yield url, app


@pytest.fixture
def client(server: Any) -> Any:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _expected(target: str | Path, prompts: list[str], chat: bool, n: int = N) -> list[str]:
    loaded = load_model(target, device="cpu")
    return generate(loaded.model, loaded.tokenizer, prompts, GenerationOptions(max_new_tokens=n, batch_size=1),
                    chat=chat, system_prompt=loaded.system_prompt if chat else None)


def _chat(client: Any, model: str, prompt: str, **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=N, temperature=0, **kw)


def test_models_list_names_base_adapters_and_merged_run(client: Any) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny-llama", "a-merged", "a", "b"}
    assert cards["a"].parent == "tiny-llama" and cards["b"].parent == "tiny-llama"
    assert cards["tiny-llama"].parent is None and cards["a-merged"].parent is None
    assert cards["a"].root == "tiny-llama" and cards["a"].object == "model"
    assert client.models.retrieve("a").parent == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_each_adapter_replies_as_generate_on_its_run_and_as_the_merged_model(client: Any, runs: dict[str, Path]) -> None:
    want_a = _expected(runs["a"], PROMPTS, chat=True)
    got_a = [_chat(client, "a", p).choices[0].message.content for p in PROMPTS]
    assert got_a == want_a
    assert [_chat(client, "a-merged", p).choices[0].message.content for p in PROMPTS] == want_a

    want_b = _expected(runs["b"], ["the cat", "the owl"], chat=False)
    got_b = [client.completions.create(model="b", prompt=p, max_tokens=N, temperature=0).choices[0].text
             for p in ("the cat", "the owl")]
    assert got_b == want_b
    want_base = _expected("tiny-llama", ["the cat"], chat=False)
    base = client.completions.create(model="tiny-llama", prompt="the cat", max_tokens=N, temperature=0)
    assert base.choices[0].text == want_base[0]
    assert want_base[0] != want_b[0], "the CLM adapter should change the base's continuation"

    r = _chat(client, "a", "say cat")  # switching back after b and the base: still a's output
    assert r.choices[0].message.content == want_a[0]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= N and r.choices[0].finish_reason in ("stop", "length")


def test_completions_several_prompts_and_n(client: Any) -> None:
    r = client.completions.create(model="b", prompt=["the cat", "the owl"], max_tokens=4, temperature=0, n=2)
    texts = [c.text for c in r.choices]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    sampled = client.completions.create(model="b", prompt="the cat", max_tokens=6, temperature=1.0, seed=3)
    again = client.completions.create(model="b", prompt="the cat", max_tokens=6, temperature=1.0, seed=3)
    assert sampled.choices[0].text == again.choices[0].text  # a seed makes sampling repeatable


def test_stream_concatenates_to_the_plain_reply_and_ends_with_done(client: Any, server: Any) -> None:
    plain = _chat(client, "a", "say dog").choices[0].message.content
    chunks = list(_chat(client, "a", "say dog", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    stop = plain[4:6]  # a stop string inside the reply: both cut there, the stream never shows past it
    assert len(plain) > 6 and stop.strip()
    cut = _chat(client, "a", "say dog", stop=[stop]).choices[0]
    assert cut.message.content == plain[:plain.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, "a", "say dog", stop=stop, stream=True)
                       if c.choices)
    assert streamed == cut.message.content

    raw = httpx.post(server[0] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": "b", "prompt": "the cat", "max_tokens": 4, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in raw.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == client.completions.create(model="b", prompt="the cat", max_tokens=4).choices[0].text


def test_embeddings_are_mean_pooled_hidden_states(client: Any, server: Any) -> None:
    texts = ["the cat sat", "a dog"]
    r = client.embeddings.create(model="tiny-llama", input=texts)  # the client asks for base64
    got = torch.tensor([d.embedding for d in r.data])
    loaded = load_model("tiny-llama", device="cpu")
    for i, t in enumerate(texts):
        enc = loaded.tokenizer(t, return_tensors="pt")
        with torch.no_grad():
            h = loaded.model(**enc, output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(got[i], h.mean(0), atol=1e-4, rtol=1e-4)
    assert r.usage.prompt_tokens == sum(len(loaded.tokenizer(t)["input_ids"]) for t in texts)
    floats = httpx.post(server[0] + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "a", "input": "the cat sat", "encoding_format": "float"}).json()
    assert len(floats["data"][0]["embedding"]) == got.shape[1]
    assert not torch.allclose(torch.tensor(floats["data"][0]["embedding"]), got[0]), "the adapter changes the states"


def _post(url: str, path: str, body: Any, key: str | None = KEY, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={**headers, "content-type": "application/json"}, **kw)
    return httpx.post(url + path, json=body, headers=headers, **kw)


def _is_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    return err


def test_errors_are_4xx_in_the_openai_shape(client: Any, server: Any) -> None:
    url = server[0]
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, "no-such-model", "hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    _is_openai_error(httpx.get(url + "/v1/models"), 401)
    assert httpx.get(url + "/health").status_code == 200  # probes need no key

    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[Any, int, str | None]] = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({**chat, "max_tokens": 10_000}, 400, "max_tokens"),
        ({**chat, "max_tokens": 0}, 400, "max_tokens"),
        ({**chat, "temperature": 5}, 400, "temperature"),
        ({**chat, "n": 99}, 400, "n"),
        ({**chat, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**chat, "logprobs": True}, 400, "logprobs"),
        ({**chat, "messages": []}, 400, "messages"),
        ({**chat, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ({"messages": chat["messages"]}, 400, "model"),
        ({**chat, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
        ({**chat, "model": "b"}, 400, "messages"),  # a CLM run's tokenizer has no chat template
        ({**chat, "stream": True, "n": 2}, 400, "n"),
    ]
    for body, status, param in cases:
        err = _is_openai_error(_post(url, "/v1/chat/completions", body), status)
        assert err["param"] == param, (body, err)
    err = _is_openai_error(_post(url, "/v1/chat/completions", b"{" + b" " * 30_000 + b"}"), 413)
    assert err["code"] == "body_too_large"
    _is_openai_error(_post(url, "/v1/classify", {"model": "a", "input": "x"}), 400)  # not a classifier run
    _is_openai_error(_post(url, "/v1/embeddings", {"model": "a", "input": []}), 400)
    _is_openai_error(_post(url, "/v1/completions", {"model": "b", "prompt": [1, 2, 3]}), 400)
    _is_openai_error(httpx.get(url + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)
    _is_openai_error(httpx.put(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}), 405)
    _is_openai_error(httpx.delete(url + "/v1/adapters/tiny-llama", headers={"Authorization": f"Bearer {KEY}"}), 400)
    assert _chat(client, "a", "say cat").choices[0].message.content  # still serving


def test_concurrent_requests_mixing_adapters_are_batched_and_not_mixed(client: Any, server: Any,
                                                                      runs: dict[str, Path]) -> None:
    want = {("a", p): w for p, w in zip(PROMPTS, _expected(runs["a"], PROMPTS, chat=True), strict=True)}
    want |= {("b", p): w for p, w in zip(PROMPTS, _expected(runs["b"], PROMPTS, chat=False), strict=True)}
    want |= {("tiny-llama", p): w for p, w in zip(PROMPTS, _expected("tiny-llama", PROMPTS, chat=False), strict=True)}
    want |= {("b3", p): w for p, w in zip(PROMPTS, _expected(runs["b"], PROMPTS, chat=False, n=3), strict=True)}
    jobs = [(m, p) for m in ("a", "b", "tiny-llama", "b3") for p in PROMPTS] * 3
    batcher = server[1].state.serve.batcher
    before = batcher.batches

    def one(job: tuple[str, str]) -> str:
        m, p = job
        if m == "a":
            return _chat(client, m, p).choices[0].message.content
        limit = 3 if m == "b3" else N  # b with another max_tokens: shares b's batches, cut at its own limit
        return client.completions.create(model=m[0] if m == "b3" else m, prompt=p, max_tokens=limit,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(12) as ex:
        got = list(ex.map(one, jobs))
    for job, text in zip(jobs, got, strict=True):
        assert text == want[job], job  # left-padded batches give each row its own adapter's greedy output
    assert batcher.batches - before < len(jobs), "concurrent requests of one adapter should share batches"
    metrics = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'tuneforge_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert "tuneforge_loaded_adapters 2" in metrics


def test_a_client_leaving_a_stream_stops_its_generation(client: Any, server: Any) -> None:
    url = server[0]
    full = client.completions.create(model="tiny-llama", prompt="the cat", max_tokens=64, temperature=0)
    assert full.usage.completion_tokens == 64  # runs to the limit when nobody leaves

    def generated() -> float:
        text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return float(text.split("tuneforge_completion_tokens_total ")[1].split()[0])

    before = generated()
    with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": "tiny-llama", "prompt": "the cat", "max_tokens": 64, "stream": True}) as r:
        for line in r.iter_lines():
            if '"text": "' in line:
                break  # the first piece of text: leave
    # the next request is served after the abandoned one ended; it counted fewer tokens than the limit
    after = client.completions.create(model="tiny-llama", prompt="the", max_tokens=1, temperature=0)
    assert generated() - before - after.usage.completion_tokens < 64
