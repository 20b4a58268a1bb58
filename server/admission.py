"""Admission at the ASGI edge: ``POST /classify`` is admitted or refused before FastAPI routes it, reads its body
or decodes anything, so a refusal (503 + Retry-After) costs a few microseconds of Python: under overload from
clients that retry at once (wrk ignores Retry-After), cheap refusals keep the core for the requests admitted.

The admitted request's ``Ticket`` travels in the ASGI scope (``TICKET``) to the endpoint, and is released here
whatever happens (422 before the endpoint runs, errors, disconnects).
"""
from __future__ import annotations

import math

import orjson

from .batching import Overloaded
from .inputs import announced_images_from_headers

TICKET = "g2g.ticket"  # scope key of the admitted request's Ticket


class AdmissionGate:
    def __init__(self, app, service, path: str = "/classify"):
        self.app, self.service, self.path = app, service, path

    async def _refuse(self, send, e: Overloaded) -> None:
        body = orjson.dumps({"detail": f"server busy: {e}"})
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(max(1, math.ceil(e.retry_after))).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        service = self.service
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST" or not service.ready:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        images = announced_images_from_headers(headers, scope.get("query_string", b"").decode("latin-1"),
                                               service.bytes_per_image)
        try:
            ticket = service.batcher.admit(images)
        except Overloaded as e:
            service.metrics.rejected.inc()
            return await self._refuse(send, e)
        scope[TICKET] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.release()
