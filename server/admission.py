"""Admission of ``POST /classify``: admitted or refused before FastAPI routes it, reads its body or decodes anything.

Two places decide, with the same rule (the batcher's queue estimate for the images the headers announce):

- ``EarlyAdmission.refusal``, called by the HTTP protocol (``server/protocol.py``) as soon as a request's headers
  are parsed: a refusal there is written straight onto the socket (503 JSON + Retry-After) without an ASGI task or
  the middleware stack, so it costs a few microseconds. Under overload from clients that retry at once (wrk
  ignores Retry-After) refusals arrive by the thousand per second: cheap ones keep the core for the admitted.
  It only checks; it reserves nothing (a request it lets through can never leak a reservation).
- ``AdmissionGate``, the ASGI edge, reserves the admitted request's place (``Ticket``) and refuses what the
  protocol did not see (another server such as the TestClient, ``--http h11``, pipelined requests, or a queue
  that filled in between). The ticket travels in the ASGI scope (``TICKET``) to the endpoint, and is released
  here whatever happens (422 before the endpoint runs, errors, disconnects).
"""
from __future__ import annotations

import asyncio
import math
from urllib.parse import unquote

import orjson

from .batching import Overloaded
from .inputs import ADMISSION_HEADERS, announced_images_from_headers

TICKET = "g2g.ticket"  # scope key of the admitted request's Ticket
PATH = "/classify"
FLUSH_S = 0.25  # protocol refusals reach the Prometheus counters within this (and at every scrape of this process)


def busy_body(e: Overloaded) -> bytes:
    """The JSON body of an admission refusal (the ``ErrorResponse`` shape)."""
    return orjson.dumps({"detail": f"server busy: {e}"})


def retry_after(e: Overloaded) -> bytes:
    """Retry-After in whole seconds, at least 1."""
    return str(max(1, math.ceil(e.retry_after))).encode()


def _announced(service, headers: list[tuple[bytes, bytes]], query: bytes) -> int:
    text = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers if k.lower() in ADMISSION_HEADERS}
    return announced_images_from_headers(text, query.decode("latin-1"), service.bytes_per_image)


class EarlyAdmission:
    """The protocol's side: ``refusal`` from the request line and headers, ``count`` what it refused.

    Three Prometheus increments cost about as much as the rest of a refusal, so refusals are counted in an int
    and added to the counters in one go: at most FLUSH_S later, and before every scrape of this process."""

    def __init__(self, service):
        self.service = service
        metrics = service.metrics
        self._counters = (metrics.rejected, metrics.requests.labels(PATH, "503"), metrics.errors.labels(PATH, "503"))
        self._pending = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        metrics.before_scrape.append(self.flush)

    def refusal(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]], query: bytes) -> Overloaded | None:
        """The reason to refuse this request now, or None to hand it to the app (which may still refuse it).

        Requests whose answer the app shapes otherwise are handed on: a body over the limit (413), and with
        ``--cors-origin`` a browser request (``Origin``: the app adds the CORS headers)."""
        service = self.service
        if method != b"POST" or path != PATH or not service.ready or service.batcher is None:
            return None
        cfg = service.cfg
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > cfg.max_body_bytes:
                return None
            if name == b"origin" and cfg.cors_origins:
                return None
        try:
            service.batcher.check(_announced(service, headers, query))
        except Overloaded as e:
            return e
        return None

    def count(self) -> None:
        """A refusal in ``/metrics``, as the app would count it: rejected, and /classify 503 in requests and errors.
        Called on the event loop (protocol callbacks), like ``flush``."""
        self._pending += 1
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending = self._pending, 0
        if pending:
            for counter in self._counters:
                counter.inc(pending)


def request_path(raw_path: bytes, root_path: str = "") -> str:
    """The ASGI ``path`` of a raw request path (as uvicorn computes it)."""
    path = raw_path.decode("ascii")
    return root_path + (unquote(path) if "%" in path else path)


class AdmissionGate:
    def __init__(self, app, service, path: str = PATH):
        self.app, self.service, self.path = app, service, path

    async def _refuse(self, send, e: Overloaded) -> None:
        body = busy_body(e)
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", retry_after(e))]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        service = self.service
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST" or not service.ready:
            return await self.app(scope, receive, send)
        try:
            ticket = service.batcher.admit(_announced(service, scope["headers"], scope.get("query_string", b"")))
        except Overloaded as e:
            service.metrics.rejected.inc()
            return await self._refuse(send, e)
        scope[TICKET] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.release()
