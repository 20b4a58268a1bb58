"""Issue 14: a hostile client gets clear JSON 4xx answers, and neither it nor a bug costs other clients anything."""
import base64
import http.client
import json
import logging
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
import uvicorn  # noqa: E402

from test_server import _app, _free_port, _png, export_dir  # noqa: F401 - export_dir is a fixture


def _serve(app, **options):
    """uvicorn on a free loopback port in a thread, with ``options``; yields (host, port, app) once ready."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return server, thread, port


@pytest.fixture
def live(export_dir):  # noqa: F811
    app = _app(export_dir, max_wait_ms=0)
    server, thread, port = _serve(app)
    yield app, port
    server.should_exit = True
    thread.join(timeout=10)


class Connection:
    """One keep-alive connection; ``post``/``get`` fail if the server closed or reset it."""

    def __init__(self, port: int):
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.http.connect()
        self.local = self.http.sock.getsockname()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        self.http.request(method, path, body=body, headers=headers or {})
        r = self.http.getresponse()
        data = r.read()
        assert self.http.sock is not None and self.http.sock.getsockname() == self.local, "connection was closed"
        return r.status, r.getheader("content-type"), data


def _metric(port: int, status: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    key = f'g2g_requests_total{{path="/classify",status="{status}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))


def test_item1_hostile_json_is_a_counted_4xx_and_the_connection_lives(live):
    _, port = live
    conn = Connection(port)
    hostile = [b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
               b'{"images": [' + b"9" * 100_000 + b"]}",
               b'{"images": [' + b"1," * 100_000 + b"1]}"]
    before = {s: _metric(port, s) for s in (413, 422)}
    statuses = []
    for body in hostile:
        status, ctype, data = conn.request("POST", "/classify", body, {"content-type": "application/json"})
        statuses.append(status)
        assert ctype == "application/json" and json.loads(data)["detail"], data[:200]
        valid = json.dumps({"image": base64.b64encode(_png()).decode()}).encode()
        assert conn.request("POST", "/classify", valid, {"content-type": "application/json"})[0] == 200
    assert statuses == [422, 422, 413]
    assert _metric(port, 422) - before[422] == 2 and _metric(port, 413) - before[413] == 1


def test_item1_an_unexpected_exception_is_a_logged_counted_500_and_the_connection_lives(live, caplog):
    app, port = live
    conn = Connection(port)
    batcher = app.state.service.batcher
    real = batcher.predict

    def broken(images):
        raise RuntimeError("injected failure")
    batcher.predict = broken
    try:
        with caplog.at_level(logging.ERROR, logger="g2gserve.errors"):
            status, ctype, data = conn.request("POST", "/classify", _png())
    finally:
        batcher.predict = real
    body = json.loads(data)
    assert status == 500 and ctype == "application/json" and body["error_id"]
    assert any(body["error_id"] in r.getMessage() and "injected failure" in (r.exc_text or "") for r in caplog.records)
    assert _metric(port, 500) == 1
    assert conn.request("POST", "/classify", _png())[0] == 200  # same connection, next request fine
