"""uvicorn's httptools protocol with the bounds it lacks: a header deadline and a header size limit.

uvicorn starts timing a connection only after a response (``timeout_keep_alive``): a client that
connects and sends its request line and headers a few bytes a second holds the socket forever
(slowloris), and a 100 KB header arrives in full before anyone looks at it. Here the headers must
be complete within ``header_timeout_s`` of the connection (or of the previous response), else
408, and within ``max_header_bytes``, else 431, both as JSON with ``Connection: close``. When
``limit_concurrency`` is exceeded, the 503 is JSON as well (uvicorn's own is plain text).

Admission refusals are decided here too (``early_refusal``, on by default): once the headers of a
``POST /classify`` are parsed, the app's ``EarlyAdmission`` (``server/admission.py``) says whether the queue
can take the images they announce; if not, a canned 503 JSON with ``Retry-After`` goes straight onto the
transport, without an ASGI task or the middleware stack, and is counted in ``/metrics`` as the app would count
it. The connection stays usable: a body announced by Content-Length (up to ``DRAIN_BYTES``) is read and
discarded (within ``header_timeout_s``, else the connection is closed); any other body (chunked, larger,
``Expect: 100-continue``) is not read, and the answer says ``Connection: close``. Only a request with nothing
before it on the connection is answered here (responses stay in order); pipelined ones go to the app's gate.

The settings travel in an environment variable, so ``--workers N`` (spawned processes that import
this class by name) get them too; ``configure`` sets it.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .admission import busy_body, request_path, retry_after
from .errors import error_body, send_error

ENV = "G2G_SERVE_PROTOCOL"
DEFAULTS = {"header_timeout_s": 10.0, "max_header_bytes": 16 * 1024, "early_refusal": True}
DRAIN_BYTES = 1 << 20  # a refused request's body up to this size is read and discarded (keep-alive); larger: close
REFUSED: collections.Counter[int] = collections.Counter()  # status -> requests answered here, not by the app


class RefusalCollector:
    """Prometheus collector for ``REFUSED``: these answers never reach the app's request counter."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        family = CounterMetricFamily("g2g_protocol_refusals", "requests answered by the HTTP layer before the app: "
                                     "400 malformed, 408 slow headers, 431 headers too large, 503 connection limit",
                                     labels=["status"])
        for status, count in sorted(REFUSED.items()):
            family.add_metric([str(status)], count)
        yield family


def configure(header_timeout_s: float, max_header_bytes: int, early_refusal: bool = True) -> type[HttpToolsProtocol]:
    """Set the bounds for this process and the workers it spawns; returns the class for uvicorn's ``http=``."""
    os.environ[ENV] = json.dumps({"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes,
                                  "early_refusal": early_refusal})
    return GuardedHttpToolsProtocol


def _settings() -> dict:
    return {**DEFAULTS, **json.loads(os.environ.get(ENV, "{}"))}


def _early_admission(app):
    """The ``EarlyAdmission`` of the served app (``app.state.early_admission``), looked for through the wrappers
    uvicorn puts around it (``.app``); None for any other app."""
    for _ in range(8):
        found = getattr(getattr(app, "state", None), "early_admission", None)
        if found is not None or app is None:
            return found
        app = getattr(app, "app", None)
    return None


async def _busy(scope, receive, send) -> None:
    REFUSED[503] += 1
    await send_error(send, 503, "too many concurrent connections; try again", {"Retry-After": "1",
                                                                                "Connection": "close"})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = _settings()
        self.header_timeout_s = float(settings["header_timeout_s"])
        self.max_header_bytes = int(settings["max_header_bytes"])
        self._limit, self.limit_concurrency = self.limit_concurrency, None  # checked below, answered as JSON
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_start: float | None = None  # loop time the current request's headers began
        self._header_bytes = 0
        self._in_headers = False
        self._message_open = False  # between a request's first byte and the end of its body
        self._refused = False
        self._early = _early_admission(self.app) if settings["early_refusal"] else None
        self._discarding = False  # reading the body of a request refused here
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drained = False  # a refused request's body was read in this data_received call

    # ------------------------------------------------------------ header deadline
    def _arm(self) -> None:
        """The headers of a request start now (the timer itself only once they span more than one read)."""
        self._disarm()
        self._header_bytes = 0
        self._in_headers = True
        self._header_start = self.loop.time()

    def _disarm(self) -> None:
        self._in_headers = False
        self._header_start = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_timer(self) -> None:
        """After a read: headers begun and not complete get their deadline (a timer per request cost as much as
        the rest of this class, and almost every request's headers come in one read)."""
        if self._in_headers and self._header_start is not None and self._header_timer is None \
                and not self.transport.is_closing():
            self._header_timer = self.loop.call_at(self._header_start + self.header_timeout_s, self._headers_too_slow)

    def _refuse(self, status: int, detail: str) -> None:
        self._disarm()
        self._refused = True
        REFUSED[status] += 1
        if self.transport.is_closing():
            return
        body = error_body(status, detail)
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Unparseable HTTP: uvicorn's 400, but as JSON like every other error."""
        self._refuse(400, msg)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # not while a request is being answered
            self._refuse(408, f"request headers not received within {self.header_timeout_s:g} s")

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        self._arm_timer()  # nothing read yet: a silent connection is timed too

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._stop_draining()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline and not self._message_open:
            self._in_headers = True  # counts bytes of the next request; the keep-alive timer bounds idling

    def on_message_begin(self) -> None:
        self._message_open = True
        super().on_message_begin()
        if self._header_start is None:  # a pipelined request: its headers are timed from here
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            if self._header_start is None:  # first bytes after a response: the next request's headers are timed
                self._arm()
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.max_header_bytes:  # still no end of headers
            self._refuse(431, f"request headers over the limit of {self.max_header_bytes:,} bytes")
        self._arm_timer()
        if self._drained or self._discarding:
            self._drained = False
            idle = self.cycle is None or self.cycle.response_complete
            if self._discarding:  # the refused request's body is still coming: bounded (armed only now, seldom)
                if self._drain_timer is None and not self.transport.is_closing():
                    self._drain_timer = self.loop.call_later(self.header_timeout_s, self._drain_too_slow)
            elif idle and self._header_start is None and not self.transport.is_closing():
                # nothing more arrived after the refused request: idle keep-alive, as after any response
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    def on_headers_complete(self) -> None:
        self._disarm()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_header_bytes:
            self._refuse(431, f"request headers over the limit of {self.max_header_bytes:,} bytes")
            return
        # this connection is one of self.connections; the task for this request is not in self.tasks yet
        busy = self._limit is not None and (len(self.connections) > self._limit or len(self.tasks) >= self._limit)
        if not busy:
            if self._early is not None and self._refuse_early():
                return
            return super().on_headers_complete()
        app, self.app = self.app, _busy
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_body(self, body: bytes) -> None:
        if not self._refused and not self._discarding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._message_open = False
        if self._discarding:  # the refused request's body is read: the connection takes the next request
            self._stop_draining()
            self._drained = True
            self._in_headers = True  # the next request's headers are counted from the next bytes received
            self._header_bytes = 0  # (not the refused body's: that is no header, however large)
        elif not self._refused:
            super().on_message_complete()
            if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
                # answered before its body was read (a refusal): the next request's headers start after it, not
                # at the answer (the rest of that body is no header, however large)
                self._in_headers, self._header_bytes = True, 0

    # ------------------------------------------------------------ admission refusals, without the app
    def _refuse_early(self) -> bool:
        """Answer 503 here if the app's admission would refuse this request; True if it did."""
        if self.pipeline or not (self.cycle is None or self.cycle.response_complete):
            return False  # an earlier request is still being answered: its response must go first
        method = self.parser.get_method()
        if method != b"POST":
            return False
        url = httptools.parse_url(self.url)
        reason = self._early.refusal(method, request_path(url.path, self.root_path), self.headers, url.query or b"")
        if reason is None:
            return False
        length = next((v for k, v in self.headers if k == b"content-length"), None)
        chunked = any(k == b"transfer-encoding" for k, _ in self.headers)
        keep_alive = (self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
                      and not self.expect_100_continue and not chunked
                      and length is not None and length.isdigit() and int(length) <= DRAIN_BYTES)
        body = busy_body(reason)
        head = [b"HTTP/1.1 503 Service Unavailable\r\n"]
        head += [b"%s: %s\r\n" % kv for kv in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nretry-after: %s\r\n%s\r\n"
                    % (len(body), retry_after(reason), b"" if keep_alive else b"connection: close\r\n"))
        self.transport.write(b"".join(head) + body)
        self._early.count()
        self.server_state.total_requests += 1
        if self.access_log:
            client = "%s:%d" % self.client if self.client else ""  # uvicorn's access-log format and arguments
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', client, "POST", self.url.decode("latin-1"),
                                    self.parser.get_http_version(), 503)
        if not keep_alive:
            self._refused = True  # nothing more is read on this connection
            self.transport.close()
            return True
        self._discarding = True  # data_received bounds the rest of the body if it does not come with the headers
        return True

    def _drain_too_slow(self) -> None:
        self._drain_timer = None
        self._refused = True
        self.transport.close()

    def _stop_draining(self) -> None:
        self._discarding = False
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
