"""Adapter management and probes: ``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, ``/health``, ``/metrics``.

Loads and unloads run on the worker thread between batches, so a request already queued for an adapter
being unloaded gets a 404 in the OpenAI shape, never a half-switched model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from tuneforge.serve.errors import ERROR_RESPONSES, APIError
from tuneforge.serve.schemas import LoadAdapterRequest, ModelCard
from tuneforge.serve.state import ServerState

__all__ = ["router"]

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.serve


class Deleted(BaseModel):
    id: str
    object: str = "adapter"
    deleted: bool = True


class Health(BaseModel):
    status: str
    models: int
    adapters: int
    queue: int


@router.post("/v1/adapters", response_model=ModelCard, responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400]})
async def load_adapter(req: LoadAdapterRequest, request: Request) -> Any:
    """Attach a saved adapter run to the base it was trained on (evicting the least recently used adapter
    past ``--max-loaded``); refused with the reason for another base or a method that cannot share one."""
    from tuneforge.errors import TuneforgeError

    state = _state(request)
    if req.name in state.pool.names():
        raise APIError(409, f"the name '{req.name}' is already served", param="name", code="name_taken")

    def load() -> ModelCard:
        try:
            return state.pool.add_adapter(req.name, req.path).card()
        except APIError:
            raise
        except (TuneforgeError, OSError, ValueError, KeyError) as e:  # unreadable or foreign folder contents
            raise APIError(400, f"cannot load an adapter from {req.path[:200]}: {str(e)[:500]}", param="path",
                           code="adapter_invalid") from None

    return await state.on_worker(load)


@router.delete("/v1/adapters/{name}", response_model=Deleted, responses=ERROR_RESPONSES)
async def unload_adapter(name: str, request: Request) -> Any:
    """Unload the adapter ``name``; its base and the other adapters stay loaded."""
    state = _state(request)
    state.pool.get(name)  # 404 before queueing

    def unload() -> Deleted:
        state.pool.remove_adapter(name)
        return Deleted(id=name)

    return await state.on_worker(unload)


@router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    """Liveness: the worker is running; counts of what is loaded and waiting (no key needed)."""
    state = _state(request)
    return Health(status="ok", models=len(state.pool.entries()), adapters=len(state.pool.adapters()),
                  queue=state.batcher.depth)


@router.get("/metrics", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def metrics(request: Request) -> str:
    """Prometheus text: requests by route and status, latency p50/p95, tokens, tokens/s, adapters, queue."""
    state = _state(request)
    pool, b = state.pool, state.batcher
    return state.metrics.render({
        "loaded_models": len(pool.entries()), "loaded_adapters": len(pool.adapters()),
        "adapter_evictions_total": pool.evictions, "adapter_switches_total": pool.switches,
        "adapter_switch_seconds_total": round(pool.switch_seconds, 6), "queue_depth": b.depth,
        "batches_total": b.batches, "batched_sequences_total": b.batched_rows,
    })
