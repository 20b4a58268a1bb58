"""Every error as JSON in one documented shape, and no exception that can reach uvicorn.

An exception that escapes the app makes Starlette answer a plain-text 500 and re-raise, and uvicorn
then closes the connection: the next request on that keep-alive connection is reset, and
``/metrics`` (counted by a middleware the exception skipped) never sees it. ``ErrorMiddleware``
turns such an exception into a 500 JSON with an error id that is also in the log, and returns
normally, so the middleware above it counts the 500 and uvicorn keeps the connection.
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("g2gserve.errors")


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str
    errors: list[ValidationIssue] | None = None  # 422 on query parameters: which one and why
    error_id: str | None = None  # 500: the id of the logged traceback


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the listed statuses all answer an ``ErrorResponse``."""
    descriptions = {400: "Malformed request", 401: "Missing or wrong credentials", 404: "Not found",
                    408: "Request body not received in time", 409: "Already running",
                    413: "Too large (body, pixels, images or JSON values)", 415: "Not a supported image",
                    422: "Invalid request (parameters, JSON, base64 or image data)",
                    431: "Request headers too large", 500: "Unexpected error (see error_id in the log)",
                    503: "Not ready, busy or past the request deadline (see Retry-After)"}
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")} for s in statuses}


def error_body(status: int, detail: str, **extra: Any) -> bytes:
    return json.dumps({"detail": detail, **extra}).encode()


async def send_error(send, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
    """Answer an ASGI request with an ``ErrorResponse`` (for pure-ASGI middleware)."""
    body = error_body(status, detail, **extra)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    issues = [{"loc": [str(p) if not isinstance(p, int) else p for p in e.get("loc", ())],
               "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in issues) or "invalid request"
    return JSONResponse({"detail": summary, "errors": issues}, status_code=422)


class TrackedSend:
    """An ASGI ``send`` that remembers whether the response has started, and its status: a middleware may
    answer an error only before that (after it, half a response is out and nothing valid can follow)."""

    def __init__(self, send):
        self._send, self.started, self.status = send, False, 500  # 500 until a response starts

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
        await self._send(message)


class ErrorMiddleware:
    """Pure ASGI: an unexpected exception -> logged with an id, answered 500 JSON, not re-raised."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the point of this middleware
            error_id = uuid.uuid4().hex[:12]
            log.exception("error_id=%s: unexpected error on %s %s", error_id, scope.get("method"), scope.get("path"))
            if tracked.started:  # half a response is out: nothing valid can follow on this connection
                raise
            await send_error(send, 500, "internal error; the server log has the details", error_id=error_id)


def install_error_handling(app: FastAPI) -> None:
    """JSON for HTTP errors and validation errors; ``ErrorMiddleware`` inside the middlewares added later."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(ErrorMiddleware)
