"""Time bounds inside the app: a slow request body is cut (408), a slow request is cut (503).

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and, with ``server/protocol.py``,
slow request headers; once the headers are in, nothing bounds how long a client may take to send
the body (2 bytes a second held sockets for as long as the client liked) or how long the answer
may take. ``DeadlineMiddleware`` does both, answering with an ``ErrorResponse`` while it still can.
"""
from __future__ import annotations

import asyncio

from .errors import TrackedSend, send_error


class _BodyTimeout(Exception):
    pass


async def _within(awaitable, seconds: float):
    """``await awaitable``, TimeoutError after ``seconds``; ``asyncio.timeout`` where it exists (no extra task)."""
    if hasattr(asyncio, "timeout"):  # Python 3.11+
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def _buffered(receive) -> bool:
    """True when ``receive`` is uvicorn's and the whole body is already in (the usual small request): it returns
    at once, and a timeout around it (a timer per call) would cost more than the rest of this middleware."""
    return getattr(getattr(receive, "__self__", None), "more_body", True) is False


class DeadlineMiddleware:
    """Pure ASGI: the whole body within ``body_timeout_s``; the whole answer within ``request_timeout_s``."""

    def __init__(self, app, body_timeout_s: float, request_timeout_s: float):
        self.app, self.body_timeout_s, self.request_timeout_s = app, body_timeout_s, request_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + self.body_timeout_s
        request_deadline = loop.time() + self.request_timeout_s
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done or _buffered(receive):  # after the body only http.disconnect can come: wait as long as
                return await receive()             # the app likes; a body already received cannot be slow
            try:
                message = await _within(receive(), max(0.0, body_deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _BodyTimeout() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        tracked = TrackedSend(send)
        try:
            await _within(self.app(scope, timed_receive, tracked), self.request_timeout_s)
        except _BodyTimeout:
            if not tracked.started:
                await send_error(send, 408, f"request body not received within {self.body_timeout_s:g} s",
                                 {"Connection": "close"})
        except asyncio.TimeoutError:
            if loop.time() < request_deadline or tracked.started:
                raise  # a timeout of the app's own, not the deadline: ErrorMiddleware reports it
            await send_error(send, 503, f"no answer within the request deadline of {self.request_timeout_s:g} s",
                             {"Retry-After": "1"})
