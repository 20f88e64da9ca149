"""The ``serve`` verb: an OpenAI-compatible HTTP server over models, adapters and task runs.

``tuneforge serve [NAME=]MODEL_OR_RUN ... [--adapter NAME=RUN ...] [--host 127.0.0.1] [--port 8000]
[--api-key KEY | TUNEFORGE_API_KEY] [--max-loaded N] ...`` loads everything first (errors exit 2 with the
argument named), then serves until interrupted. Needs the ``serve`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        models: Annotated[list[str] | None, typer.Argument(
            help="[NAME=]MODEL_OR_RUN: registry name, HF folder or run directory; listed by /v1/models under "
                 "NAME (default: as given)")] = None,
        adapter: Annotated[list[str] | None, typer.Option(
            "--adapter", help="NAME=RUN: an adapter run attached to the loaded base it was trained on")] = None,
        host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port")] = 8000,
        api_key: Annotated[str | None, typer.Option(
            "--api-key", help="require 'Authorization: Bearer KEY' (default: $TUNEFORGE_API_KEY)")] = None,
        max_loaded: Annotated[int, typer.Option(help="adapters held at once (LRU eviction)")] = 8,
        max_batch_size: Annotated[int, typer.Option(help="sequences per forward pass at most")] = 32,
        batch_window_ms: Annotated[float, typer.Option(help="wait for more requests to batch (ms)")] = 10.0,
        max_queue: Annotated[int, typer.Option(help="waiting requests at most (429 beyond)")] = 256,
        max_tokens_cap: Annotated[int, typer.Option(help="largest max_tokens a request may ask")] = 1024,
        max_prompt_tokens: Annotated[int, typer.Option(help="prompt tokens per input at most")] = 2048,
        max_body_bytes: Annotated[int, typer.Option(help="request body bytes at most (413 beyond)")] = 1_000_000,
        timeout: Annotated[float, typer.Option(help="seconds before a request is answered 503")] = 300.0,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    ) -> None:
        """Serve models and adapters with an OpenAI-compatible API (chat, completions, embeddings) plus
        /v1/classify, /v1/tag and /v1/answer for encoder runs."""
        from pydantic import ValidationError

        from tuneforge.errors import ConfigError
        from tuneforge.serve import require_extra

        require_extra()
        from tuneforge.serve import ServeSettings, build_pool
        from tuneforge.serve import serve as run_server

        try:
            settings = ServeSettings(
                host=host, port=port, api_key=api_key or os.environ.get("TUNEFORGE_API_KEY") or None,
                max_loaded=max_loaded, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                max_queue=max_queue, max_tokens_cap=max_tokens_cap, max_prompt_tokens=max_prompt_tokens,
                max_body_bytes=max_body_bytes, request_timeout_s=timeout, device=device)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(err["msg"], key=".".join(str(p) for p in err["loc"])) from None
        pool = build_pool(list(models or []), list(adapter or []), settings)
        names = ", ".join(f"{c.id}" + (f" (adapter of {c.parent})" if c.parent else "") for c in pool.cards())
        typer.echo(f"serving {names} on http://{settings.host}:{settings.port}/v1"
                   + (" (API key required)" if settings.api_key else ""))
        if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
            typer.echo("warning: listening beyond loopback without an API key", err=True)
        run_server(pool, settings)
