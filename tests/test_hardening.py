"""Issue 14: a hostile client gets clear JSON 4xx answers, and neither it nor a bug costs other clients anything."""
import asyncio
import base64
import http.client
import json
import logging
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")

from live import start_server
from test_server import _app, _png, export_dir  # noqa: F401 - export_dir is a fixture


_serve = start_server  # (server, thread, port) once /readyz answers


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

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                kept: bool = True):
        self.http.request(method, path, body=body, headers=headers or {})
        r = self.http.getresponse()
        data = r.read()
        assert not kept or self.http.sock is not None and self.http.sock.getsockname() == self.local, "connection was closed"
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


# ------------------------------------------------------------------ item 3: admin calls
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_item3_calibration_needs_the_admin_token_and_runs_one_at_a_time(export_dir):  # noqa: F811
    from fastapi.testclient import TestClient
    with TestClient(_app(export_dir, calibrate=False)) as c:  # no token: the endpoint does not exist
        assert c.post("/stats/calibrate").status_code == 404
        assert "/stats/calibrate" not in c.get("/openapi.json").json()["paths"]
        assert c.get("/stats").json()["config"]["admin_token"] is False
    from server.app import ServeConfig, create_app
    cfg = ServeConfig(model=str(export_dir), device="cpu", calibrate=False, admin_token="s3cret",
                      calibration_seconds=0.2, memory_probe=False)
    with TestClient(create_app(cfg)) as c:
        assert c.post("/stats/calibrate").status_code == 401
        assert c.post("/stats/calibrate", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert "s3cret" not in c.get("/stats").text
        auth = {"Authorization": "Bearer s3cret"}
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(c.post("/stats/calibrate", headers=auth)))
                   for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(r.status_code for r in statuses) == [200, 409, 409, 409], [r.text for r in statuses]
        assert next(r for r in statuses if r.status_code == 200).json()["status"] == "done"
        settled = _rss()
        for _ in range(3):
            assert c.post("/stats/calibrate", headers=auth).status_code == 200
        assert _rss() - settled < 48 * 2**20  # memory back to its level, not growing per calibration


# ------------------------------------------------------------------ items 5 and 7: slow and oversized clients
@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with short bounds: headers 0.5 s, body 0.5 s, deadline 1 s, keep-alive 0.5 s, 3 connections."""
    import os

    from g2gserve.export import export_checkpoint
    from server import protocol
    from test_export import _checkpoint
    tmp = tmp_path_factory.mktemp("guarded")
    _, _, path = _checkpoint(tmp, granularity="block")
    export_checkpoint(path, tmp / "exp")
    saved = os.environ.get(protocol.ENV)
    app = _app(tmp / "exp", calibrate=False, max_wait_ms=0, body_timeout_s=0.5, request_timeout_s=1.0)

    async def slow():  # a request that takes longer than the deadline, whatever the batcher does
        await asyncio.sleep(3)
    app.add_api_route("/slow", slow)
    server, thread, port = _serve(app, http=protocol.configure(0.5, 16 * 1024), timeout_keep_alive=0.5,
                                  limit_concurrency=3)
    yield app, port
    server.should_exit = True
    thread.join(timeout=10)
    if saved is None:
        os.environ.pop(protocol.ENV, None)
    else:
        os.environ[protocol.ENV] = saved


def _raw(port: int, pieces, pause: float = 0.0, wait: float = 3.0) -> tuple[bytes, float]:
    """Send ``pieces`` with ``pause`` between them; return what came back until the server closed, and when."""
    import socket
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(wait)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return data, time.monotonic() - start


def _status_and_json(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), data[:300]
    return int(head.split()[1]), json.loads(body)


def test_item5_slow_headers_are_cut_with_408(guarded):
    _, port = guarded
    trickle = [bytes([b]) for b in b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"]
    data, seconds = _raw(port, trickle, pause=0.1)
    assert _status_and_json(data)[0] == 408 and seconds < 4
    silent, seconds = _raw(port, [], wait=3.0)  # connects, sends nothing
    assert _status_and_json(silent)[0] == 408 and seconds < 2


def test_item5_slow_body_is_cut_with_408_and_deadline_503(guarded):
    app, port = guarded
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    data, seconds = _raw(port, [head] + [b"xx"] * 20, pause=0.1)
    assert _status_and_json(data)[0] == 408 and seconds < 4
    r = httpx.get(f"http://127.0.0.1:{port}/slow", timeout=5)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "deadline" in r.json()["detail"]


def test_item5_idle_keep_alive_closed_and_connections_limited(guarded):
    _, port = guarded
    conn = Connection(port)
    assert conn.request("GET", "/healthz")[0] == 200
    time.sleep(1.0)  # past the keep-alive timeout
    with pytest.raises((ConnectionError, http.client.HTTPException, AssertionError)):
        conn.request("GET", "/healthz")
    held = [Connection(port) for _ in range(3)]  # the limit: 3 connections
    status, ctype, data = Connection(port).request("GET", "/healthz", kept=False)
    assert status == 503 and ctype == "application/json" and "concurrent" in json.loads(data)["detail"]
    for c in held:
        c.http.close()


def test_item7_a_huge_header_in_pieces_gets_431(guarded):
    _, port = guarded
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    data, _ = _raw(port, [head] + [b"a" * 10_000] * 10 + [b"\r\n\r\n"], pause=0.01)
    status, body = _status_and_json(data)
    assert status == 431 and "16,384" in body["detail"]
    assert Connection(port).request("GET", "/healthz")[0] == 200  # the server is fine
    assert 'g2g_protocol_refusals_total{status="431"}' in httpx.get(f"http://127.0.0.1:{port}/metrics").text


def test_a_request_answered_before_its_body_leaves_the_connection_usable(guarded):
    """The rest of a large body that follows an early answer is no header: the next request is served (was 431)."""
    import socket
    _, port = guarded
    body = b"\0" * 40_000  # more than the 16 KiB header limit
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        s.sendall(b"POST /classify?top_k=0 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 422"), first[:200]
        s.sendall(body)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second = b""
        while b"\r\n\r\n" not in second:
            second += s.recv(65536)
    assert second.startswith(b"HTTP/1.1 200"), second[:200]
