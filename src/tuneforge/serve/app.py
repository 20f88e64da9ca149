"""The FastAPI application: `create_app(pool, settings)` wires routes, errors, limits and the worker.

Tests build the app around a pool they loaded; `tuneforge serve` loads the pool from its arguments
(`build_pool`) and runs the app with uvicorn (`serve`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tuneforge.serve.errors import install_error_handlers
from tuneforge.serve.metrics import Metrics
from tuneforge.serve.middleware import GuardMiddleware
from tuneforge.serve.pool import ModelPool
from tuneforge.serve.settings import ServeSettings
from tuneforge.serve.state import ServerState

__all__ = ["build_pool", "create_app", "serve"]


def create_app(pool: ModelPool, settings: ServeSettings | None = None) -> FastAPI:
    """An app serving ``pool``; its worker thread starts with the app and stops with it."""
    from tuneforge.serve import routes_admin, routes_openai, routes_tasks

    settings = settings or ServeSettings()
    state = ServerState(pool, settings, Metrics())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        try:
            yield
        finally:
            state.batcher.stop()

    app = FastAPI(title="tuneforge serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API over one base model and many fine-tuned adapters, plus "
                              "task routes for encoder runs. Errors use the OpenAI error shape.")
    app.state.serve = state
    install_error_handlers(app)
    for module in (routes_openai, routes_tasks, routes_admin):
        app.include_router(module.router)
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       metrics=state.metrics)
    state.batcher.start()  # also without lifespan events (a bare ASGI transport); start is idempotent
    return app


def build_pool(models: list[str], adapters: list[str], settings: ServeSettings) -> ModelPool:
    """Load ``[NAME=]TARGET`` models, then ``NAME=RUN`` adapters onto their bases (errors name the argument)."""
    from tuneforge.errors import ConfigError
    from tuneforge.serve.errors import APIError

    pool = ModelPool(max_loaded=settings.max_loaded, device=settings.device)
    if len(adapters) > settings.max_loaded:
        raise ConfigError(f"{len(adapters)} adapters given but --max-loaded is {settings.max_loaded}",
                          key="max_loaded")
    for spec in models:
        name, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
        try:
            pool.add_model(target, name or None)
        except APIError as e:
            raise ConfigError(e.message, key=spec) from None
    for spec in adapters:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError("--adapter takes NAME=RUN", key=spec)
        try:
            pool.add_adapter(name, path)
        except APIError as e:
            raise ConfigError(e.message, key=spec) from None
    if not pool.names():
        raise ConfigError("give a model or run to serve (e.g. `tuneforge serve smollm2-135m`)")
    return pool


def serve(pool: ModelPool, settings: ServeSettings, **uvicorn_kwargs: Any) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(pool, settings), host=settings.host, port=settings.port, log_level="info",
                **uvicorn_kwargs)
