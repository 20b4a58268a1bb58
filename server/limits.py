"""Request-body limit for any ASGI app: FastAPI/uvicorn have none by default (shared notes).

Checks Content-Length up front and also counts streamed bytes, so a chunked upload without
Content-Length is cut off as soon as it passes the limit. Answers 413 with a JSON body.
"""
from __future__ import annotations

from .errors import TrackedSend, send_error


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, send) -> None:
        await send_error(send, 413, f"request body over the limit of {self.max_bytes:,} bytes", {"Connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except BodyTooLarge:
            if not tracked.started:
                await self._reject(send)
