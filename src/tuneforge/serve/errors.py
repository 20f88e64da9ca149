"""Every failure as a JSON body in the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``.

Clients (the ``openai`` package among them) read ``error.message``; the status code says whose fault it
was. Validation errors become 400 naming the offending field, unknown routes 404, and anything
unexpected a 500 with a one-line message and no traceback (the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ERROR_RESPONSES", "APIError", "error_body", "install_error_handlers"]

log = logging.getLogger("tuneforge.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 501: "not_implemented_error",
          503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error a route answers with: HTTP status, message, the request field at fault, a short code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict[str, Any]:
    """The OpenAI error object for these values."""
    kind = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err.status, err.message, err.param, err.code, err.type), status_code=err.status,
                        headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a union member (``list[str]``, ``constrained-str``,
    ``QAPair``) rather than a field: our fields are lower-case identifiers."""
    return isinstance(part, str) and ("[" in part or "-" in part or part[:1].isupper() or part in _TYPE_TAGS)


def _loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path") and not _is_tag(p)]
    return ".".join(parts) or None


def _pick(errors: list[Any]) -> dict[str, Any]:
    """The error to report. For a union field (``stop``: a text or a list of texts) pydantic reports one
    error per member; the members whose only complaint is the value's type are the ones the client did not
    mean, so the deepest other error is reported ("stop.1: ... at least 1 character", not "should be a
    valid string")."""
    if not errors:
        return {"msg": "invalid request", "loc": ()}
    tagged = [e for e in errors if any(_is_tag(p) for p in e.get("loc", ()))]
    meant = [e for e in tagged if not str(e.get("type", "")).endswith(("_type", "_attributes_type"))]
    return max(meant, key=lambda e: len(e.get("loc", ()))) if len(tagged) > 1 and meant else errors[0]


def install_error_handlers(app: FastAPI) -> None:
    """Make every exception a route can raise answer in the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return _response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = list(exc.errors())
        same_field = [e for e in errs if errs and tuple(e.get("loc", ()))[:2] == tuple(errs[0].get("loc", ()))[:2]]
        first = _pick(same_field)
        param = _loc(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg, param = "the body is not valid JSON", None
        elif param is None:
            msg = "the body must be a JSON object with this route's fields (see /docs)"
        elif first.get("type") == "missing":
            msg = f"'{param}' is required"
        else:
            msg = f"{param}: {msg}" if param else msg
        return _response(APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "no such route; see /docs for the API"
        return _response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _response(APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                                  type_="server_error"))


_ERR_SCHEMA = {"application/json": {"schema": {"type": "object", "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                     "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    "required": ["message", "type"]}}, "required": ["error"]}}}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": _ERR_SCHEMA} for code, desc in (
        (400, "invalid request (names the field)"), (401, "missing or wrong API key"),
        (404, "unknown model"), (413, "body too large"), (429, "queue full"), (503, "timed out or shutting down"))
}
