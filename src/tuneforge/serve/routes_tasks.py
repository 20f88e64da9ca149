"""Task routes for encoder runs: ``/v1/classify``, ``/v1/tag``, ``/v1/answer``.

Each delegates to the run objective's ``predict`` (what ``tuneforge predict`` prints), so the server
and the CLI label a text the same way; a run of another task is refused (400) naming the served runs
that fit the route.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tuneforge.serve.errors import ERROR_RESPONSES, APIError
from tuneforge.serve.schemas import (
    AnswerRequest,
    AnswerResponse,
    ClassifyRequest,
    ClassifyResponse,
    TagRequest,
    TagResponse,
)
from tuneforge.serve.state import ServerState

__all__ = ["router"]

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.serve


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
async def classify(req: ClassifyRequest, request: Request) -> Any:
    """Label and per-label probabilities of each text (a ``task=classification`` run)."""
    state = _state(request)
    entry = state.pool.get(req.model, route="classify")
    texts = req.texts()
    if req.pairs is not None and len(req.pairs) != len(texts):
        raise APIError(400, f"pairs has {len(req.pairs)} texts for {len(texts)} inputs", param="pairs",
                       code="invalid_value")
    pair_col = entry.objective.run.data.text_pair_column
    if (req.pairs is None) != (pair_col is None):
        want = "needs 'pairs' (it was trained on text pairs)" if pair_col else "takes no 'pairs'"
        raise APIError(400, f"'{req.model}' {want}", param="pairs", code="invalid_value")
    rows = await state.predict(entry, texts, req.pairs)
    labels = list(entry.objective.labels)
    return ClassifyResponse(model=req.model, data=[
        {"index": i, "label": r["label"], "probabilities": {n: r[f"p_{n}"] for n in labels}}
        for i, r in enumerate(rows)])


@router.post("/v1/tag", response_model=TagResponse, responses=ERROR_RESPONSES)
async def tag(req: TagRequest, request: Request) -> Any:
    """A tag per whitespace-separated word and the entities they form (a ``task=token_classification`` run)."""
    state = _state(request)
    entry = state.pool.get(req.model, route="tag")
    rows = await state.predict(entry, req.texts(), None)
    return TagResponse(model=req.model, data=[{"index": i, **r} for i, r in enumerate(rows)])


@router.post("/v1/answer", response_model=AnswerResponse, responses=ERROR_RESPONSES)
async def answer(req: AnswerRequest, request: Request) -> Any:
    """The answer span of each question in its context (a ``task=extractive_qa`` run)."""
    state = _state(request)
    entry = state.pool.get(req.model, route="answer")
    items = req.items()
    if any(not i.question.strip() or not i.context.strip() for i in items):
        raise APIError(400, "question and context must be non-blank", param="input", code="invalid_value")
    rows = await state.predict(entry, [i.question for i in items], [i.context for i in items])
    return AnswerResponse(model=req.model, data=[
        {"index": i, "text": r["answer"], "start": r["start"], "end": r["end"], "score": r["score"]}
        for i, r in enumerate(rows)])
