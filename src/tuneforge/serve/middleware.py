"""ASGI middleware that runs before any route: the body size limit, the API key, and request metrics.

The size limit is enforced on the bytes actually received (a missing or lying ``Content-Length`` does
not get past it), before JSON parsing. The API key is compared in constant time (`hmac.compare_digest`);
``/health``, ``/docs`` and ``/openapi.json`` stay open so probes and clients can discover the server.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from tuneforge.serve.errors import error_body
from tuneforge.serve.metrics import Metrics

__all__ = ["GuardMiddleware"]

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect")


async def _send_error(send: Any, status: int, message: str, code: str, param: str | None = None) -> None:
    body = json.dumps(error_body(status, message, param, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Size limit, bearer key and per-route metrics around the app (see module docstring)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        start = time.perf_counter()
        status_box = {"status": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                await _send_error(send_wrapper, 401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                  "invalid_api_key")
                return
            body = await self._read_body(scope, receive)
            if body is None:
                await _send_error(send_wrapper, 413, f"the request body exceeds {self.max_body} bytes",
                                  "body_too_large")
                return
            await self.app(scope, _replay(body, receive), send_wrapper)
        finally:
            self.metrics.observe(_route_label(path), status_box["status"], time.perf_counter() - start)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        assert self.api_key is not None
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes | None:
        """The whole body, or None once it passes the limit (declared or received)."""
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_body:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


_ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classify", "/v1/tag",
           "/v1/answer", "/v1/adapters", "/health", "/metrics"}


def _route_label(path: str) -> str:
    """A bounded metrics label: the route template, or ``other`` (clients choose paths; labels must not grow)."""
    if path in _ROUTES:
        return path
    for prefix, label in (("/v1/models/", "/v1/models/{id}"), ("/v1/adapters/", "/v1/adapters/{name}")):
        if path.startswith(prefix):
            return label
    return "other"


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as Starlette expects

    return replay
