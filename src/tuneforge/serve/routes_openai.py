"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``.

The request's ``model`` picks a base, an adapter or a run by the name ``/v1/models`` lists. Decoding is
greedy unless ``temperature`` > 0 (as ``tuneforge generate``). ``stream: true`` answers server-sent
events, one ``chat.completion.chunk`` (or ``text_completion``) per piece of text, ending ``data: [DONE]``;
text that may be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tuneforge.serve.engine import Row
from tuneforge.serve.errors import ERROR_RESPONSES, APIError
from tuneforge.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Usage,
)
from tuneforge.serve.state import GenPayload, ServerState

__all__ = ["router"]

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.serve


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    """Every served name: bases (``parent`` null), their adapters (``parent``: the base) and task runs."""
    return ModelList(data=_state(request).pool.cards())


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One served name (404 in the OpenAI shape when unknown)."""
    return _state(request).pool.get(model_id).card()


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    """The assistant's reply to ``messages``, rendered with the model's (the run's) chat template."""
    state = _state(request)
    entry = state.pool.get(req.model, kind="generative")
    opts = state.options(req.max_completion_tokens or req.max_tokens, state.settings.default_max_tokens,
                         req.temperature, req.top_p, req.stop, req.seed, req.n)  # type: ignore[arg-type]
    payload = GenPayload(entry, [_messages(req)], opts, chat=True, n=req.n)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(state, payload, req.model, "chat.completion.chunk", include)
    rows = (await state.generate(payload))[0]
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model,
        choices=[{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
                 for i, r in enumerate(rows)],
        usage=_usage(rows[0].prompt_tokens, sum(r.completion_tokens for r in rows)))


@router.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES)
async def completions(req: CompletionRequest, request: Request) -> Any:
    """Continuations of raw text (no chat template); ``n`` choices per prompt, ordered prompt by prompt."""
    state = _state(request)
    entry = state.pool.get(req.model, kind="generative")
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    opts = state.options(req.max_tokens, 16, req.temperature, req.top_p, req.stop, req.seed,  # type: ignore[arg-type]
                         req.n)
    payload = GenPayload(entry, list(prompts), opts, chat=False, n=req.n)
    if req.stream:
        if len(prompts) > 1:
            raise APIError(400, "stream: true takes one prompt", param="prompt", code="stream_one_prompt")
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(state, payload, req.model, "text_completion", include)
    per_prompt = await state.generate(payload)
    rows = [r for group in per_prompt for r in group]
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model,
        choices=[{"index": i, "text": r.text, "finish_reason": r.finish_reason} for i, r in enumerate(rows)],
        usage=_usage(sum(g[0].prompt_tokens for g in per_prompt), sum(r.completion_tokens for r in rows)))


async def _stream(state: ServerState, payload: GenPayload, model: str, kind: str, include_usage: bool) -> Any:
    """Start a streamed generation; errors found before the first token (prompt too long, no chat template,
    unknown adapter) are still answered as a 4xx JSON error, not inside the event stream."""
    if payload.n != 1:
        raise APIError(400, "stream: true returns one choice; use n=1 (or stream: false)", param="n",
                       code="stream_n")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    payload.push = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
    payload.cancelled = threading.Event()
    state.stream(payload)
    try:
        first = await asyncio.wait_for(events.get(), state.settings.request_timeout_s)
    except asyncio.TimeoutError:
        payload.cancelled.set()
        raise APIError(503, "the request was not started in time", code="timeout") from None
    if first[0] == "error":
        raise first[1]
    prompt_tokens: int = first[1]
    return StreamingResponse(_events(payload, events, model, kind, include_usage, prompt_tokens),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chunk(cid: str, created: int, model: str, kind: str, text: str | None, finish: str | None,
           first: bool = False) -> str:
    if kind == "chat.completion.chunk":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return "data: " + json.dumps({"id": cid, "object": kind, "created": created, "model": model,
                                  "choices": [choice]}, ensure_ascii=False) + "\n\n"


async def _events(payload: GenPayload, events: asyncio.Queue, model: str, kind: str, include_usage: bool,
                  prompt_tokens: int) -> AsyncIterator[str]:
    cid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    stops = payload.options.stop
    hold = max((len(s) for s in stops), default=1) - 1
    reply, shown = "", 0
    assert payload.cancelled is not None
    try:
        if kind.startswith("chat"):
            yield _chunk(cid, created, model, kind, None, None, first=True)
        while True:
            ev, value = await events.get()
            if ev == "text":
                reply += value
                upto = max(shown, len(reply) - hold)
                if any(s in reply for s in stops):
                    continue  # the end is known at "end"; nothing past a stop string is shown
                if upto > shown:
                    yield _chunk(cid, created, model, kind, reply[shown:upto], None)
                    shown = upto
            elif ev == "end":
                row: Row = value
                if len(row.text) > shown:
                    yield _chunk(cid, created, model, kind, row.text[shown:], None)
                yield _chunk(cid, created, model, kind, None, row.finish_reason)
                if include_usage:
                    usage = _usage(prompt_tokens, row.completion_tokens).model_dump()
                    yield "data: " + json.dumps({"id": cid, "object": kind, "created": created, "model": model,
                                                 "choices": [], "usage": usage}) + "\n\n"
                break
            else:  # an error mid-stream: the status is sent already, so say it in the stream
                err = value if isinstance(value, APIError) else APIError(500, f"generation failed ({type(value).__name__})")
                yield "data: " + json.dumps({"error": {"message": err.message, "type": err.type, "param": err.param,
                                                       "code": err.code}}) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        payload.cancelled.set()  # the client left early: stop generating


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def embeddings(req: EmbeddingRequest, request: Request) -> Any:
    """Mean-pooled last hidden states of the model (any served base, adapter, encoder or task run)."""
    state = _state(request)
    entry = state.pool.get(req.model)
    texts = req.texts()
    vecs, counts = await state.embed(entry, texts)
    data = []
    for i, v in enumerate(vecs):
        arr = v.numpy().astype(np.float32)
        emb: list[float] | str = (base64.b64encode(arr.astype("<f4").tobytes()).decode()
                                  if req.encoding_format == "base64" else arr.tolist())
        data.append({"index": i, "embedding": emb})
    n = sum(counts)
    return EmbeddingResponse(model=req.model, data=data, usage={"prompt_tokens": n, "total_tokens": n})
