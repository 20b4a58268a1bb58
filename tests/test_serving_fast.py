"""Issue 12: adaptive batching, the queue deadline, decoding off the event loop, raw pixels, workers, --variant."""
import ast
import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from server.batching import MicroBatcher, Overloaded  # noqa: E402
from server.service import Service  # noqa: E402
from server.settings import ServeConfig  # noqa: E402
from test_server import _app, _free_port, _png, _start, export_dir  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]


def _echo(x):
    return np.repeat(x.astype(np.float32).reshape(len(x), -1).mean(1, keepdims=True), 2, axis=1)


def test_a_lone_request_is_not_held_back_by_max_wait():
    async def main():
        b = MicroBatcher(_echo, max_batch=8, max_wait_s=5.0, max_queue_images=64)
        b.start()
        t = time.perf_counter()
        await b.submit(np.zeros((1, 1, 2, 2), np.uint8))
        elapsed = time.perf_counter() - t
        await b.drain()
        return elapsed
    assert asyncio.run(main()) < 1.0  # not the 5 s window


def test_max_wait_only_bounds_waiting_for_requests_still_decoding():
    calls = []

    async def main():
        b = MicroBatcher(lambda x: (calls.append(len(x)), _echo(x))[1], max_batch=8, max_wait_s=5.0,
                         max_queue_images=64)
        b.start()
        decoding = b.admit(1)  # admitted, its images still being decoded
        first = asyncio.create_task(b.submit(np.zeros((1, 1, 2, 2), np.uint8)))
        await asyncio.sleep(0.1)
        assert not first.done()  # waits for the request that is decoding ...
        t = time.perf_counter()
        second = await decoding.submit(np.ones((1, 1, 2, 2), np.uint8))  # ... which joins the same forward pass
        assert time.perf_counter() - t < 1.0 and second.probs[0, 0] == 1
        await first
        await b.drain()
    asyncio.run(main())
    assert calls == [2]


def test_queue_deadline_refuses_at_once_with_a_retry_hint():
    async def main():
        b = MicroBatcher(lambda x: (time.sleep(0.3), _echo(x))[1], max_batch=1, max_wait_s=0.0,
                         max_queue_images=64, max_queue_s=0.05)
        b.cost.observe(1, 0.3)
        b.start()
        running = asyncio.create_task(b.submit(np.zeros((1, 1, 2, 2), np.uint8)))
        await asyncio.sleep(0.05)
        t = time.perf_counter()
        with pytest.raises(Overloaded) as e:
            b.admit(1)
        assert time.perf_counter() - t < 0.01 and e.value.retry_after > 0.05
        await running
        await b.drain()
    asyncio.run(main())


def test_queue_deadline_over_http_is_503_with_retry_after(export_dir, monkeypatch):
    app = _app(export_dir, max_batch=1, max_wait_ms=0, max_queue_ms=20, calibrate=False)
    with TestClient(app) as c:
        service = app.state.service
        real = service.predict
        monkeypatch.setattr(service.batcher, "predict", lambda x: (time.sleep(0.3), real(x))[1])
        service.batcher.cost.observe(1, 0.3)
        results = []

        def hit():
            t = time.perf_counter()
            r = c.post("/classify", content=_png())
            results.append((r.status_code, r.headers.get("retry-after"), time.perf_counter() - t))
        threads = [threading.Thread(target=hit) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        refused = [r for r in results if r[0] == 503]
        assert refused and any(r[0] == 200 for r in results)
        assert all(r[1] is not None and int(r[1]) >= 1 and r[2] < 0.25 for r in refused)  # at once, not after 0.3 s
        assert "g2g_rejected_total" in c.get("/metrics").text


def test_a_slow_decode_does_not_delay_healthz(export_dir, monkeypatch):
    import server.routers.classify as classify
    real = classify.decode_body
    monkeypatch.setattr(classify, "decode_body", lambda *a: (time.sleep(1.0), real(*a))[1])
    url, server, thread = _start(_app(export_dir, calibrate=False))
    try:
        two = [("file", (f"{i}.png", _png(i), "image/png")) for i in range(2)]  # (one small image decodes inline)
        slow = threading.Thread(target=lambda: httpx.post(f"{url}/classify", files=two, timeout=10))
        slow.start()
        time.sleep(0.2)  # the request is being decoded
        t = time.perf_counter()
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert time.perf_counter() - t < 0.5 and slow.is_alive()
        slow.join()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_raw_pixels_answer_like_png(export_dir):
    import io
    from PIL import Image
    with TestClient(_app(export_dir, calibrate=False)) as c:
        pngs = [_png(i) for i in range(3)]
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)))[None] for b in pngs])  # (3, 1, 28, 28)
        by_png = c.post("/classify?top_k=10", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
        by_header = c.post("/classify?top_k=10", content=pixels.tobytes(),
                           headers={"content-type": "application/octet-stream", "x-shape": "3,1,28,28"})
        by_query = c.post("/classify?top_k=10&shape=3,28,28", content=pixels.tobytes(),
                          headers={"content-type": "application/octet-stream"})
        assert by_png.status_code == by_header.status_code == by_query.status_code == 200
        for r in (by_header, by_query):
            assert r.json()["predictions"] == by_png.json()["predictions"]
        for headers, body in (({"x-shape": "3,1,28,28"}, pixels.tobytes()[:-1]),  # one byte short
                              ({"x-shape": "3,3,28,28"}, pixels.tobytes()),  # wrong channels
                              ({"x-shape": "three"}, pixels.tobytes())):
            r = c.post("/classify", content=body, headers=headers)
            assert r.status_code == 422 and "detail" in r.json(), r.text
        r = c.post("/classify", content=b"\0" * (65 * 784), headers={"x-shape": "65,28,28"})
        assert r.status_code == 413


def test_dense_variant_answers_like_the_sparse_model_within_parity(export_dir):
    with TestClient(_app(export_dir, variant="dense", calibrate=False)) as dense, \
            TestClient(_app(export_dir, calibrate=False)) as sparse:
        body = [("file", (f"{i}.png", _png(i), "image/png")) for i in range(4)]
        a, b = dense.post("/classify?top_k=10", files=body).json(), sparse.post("/classify?top_k=10", files=body).json()
        assert a["model"]["variant"] == "dense" and b["model"]["variant"] == "sparse"
        for pa, pb in zip(a["predictions"], b["predictions"]):
            qa = {s["class_id"]: s["probability"] for s in pa["top_k"]}
            qb = {s["class_id"]: s["probability"] for s in pb["top_k"]}
            assert max(abs(qa[k] - qb[k]) for k in qa) < 1e-4


def test_stats_report_end_to_end_next_to_model_level(export_dir):
    with TestClient(_app(export_dir, admin_token="t0ken")) as c:  # the admin call needs the token (issue 14)
        for i in range(3):
            c.post("/classify", content=_png(i))
        stats = c.post("/stats/calibrate", headers={"Authorization": "Bearer t0ken"}).json()
        live = c.get("/stats").json()["live"]
    assert stats["latency"]["batch_1"]["sparse_p50_ms"] > 0
    assert live["requests"] == 3 and live["images"] == 3
    assert live["latency_ms"]["p50"] >= live["inference_ms"]["p50"] > 0 and "decode_ms" in live
    assert live["throughput"]["images_per_s"] > 0


def test_workers_share_one_startup_calibration(tmp_path, export_dir):
    services = [Service(ServeConfig(model=str(export_dir), shared_dir=str(tmp_path))) for _ in range(3)]
    assert [s.claims_startup_calibration() for s in services] == [True, False, False]
    services[0]._publish({"status": "done", "pid": 1})
    assert services[2].calibration == {"status": "done", "pid": 1}  # every worker reports the one result
    for s in services:
        s.close()


def _counter(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M))


def test_two_workers_sum_their_metrics_and_counters_never_go_down(export_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", str(export_dir), "--port", str(port), "--workers", "2",
                             "--no-calibrate", "--threads", "1", "--decode-threads", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        pids, deadline = set(), time.time() + 180
        while time.time() < deadline and len(pids) < 2:  # both workers up (new connections spread over them)
            try:
                r = httpx.get(f"{url}/readyz", timeout=5)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.3)
        assert len(pids) == 2
        name = 'g2g_requests_total{path="/classify",status="200"}'
        seen, sent = [], 0
        for round_ in range(6):
            for i in range(5):
                assert httpx.post(f"{url}/classify", content=_png(i)).status_code == 200  # a new connection each
                sent += 1
            seen.append(_counter(httpx.get(f"{url}/metrics").text, name))
        assert seen == sorted(seen) and seen[-1] == sent, seen  # summed over workers, monotone across scrapes
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert out.count("Application startup complete") == 2, out[-2000:]


SERVING_MODULES = ["app", "settings", "service", "deps", "batching", "inputs", "metrics", "limits", "schemas", "cli",
                   "routers/classify", "routers/health", "routers/stats", "routers/metrics"]


def test_server_modules_on_the_serving_path_do_not_import_torch():
    for name in SERVING_MODULES:
        tree = ast.parse((ROOT / "server" / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [m for m in mods if m == "torch" or m.startswith("torch.")], name


def test_onnxruntime_server_runs_where_torch_cannot_be_imported(export_dir):
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import g2gserve.runtime\nexcept ImportError:\n    print('RUNTIME-NEEDS-TORCH'); sys.exit(0)\n"
            "from fastapi.testclient import TestClient\n"
            "from server.app import ServeConfig, create_app\n"
            "import io, numpy as np\nfrom PIL import Image\n"  # not test_server: it imports torch
            "png = io.BytesIO()\n"
            "Image.fromarray(np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8)).save(png, 'PNG')\n"
            f"cfg = ServeConfig(model={str(export_dir)!r}, backend='onnxruntime', calibrate=False)\n"
            "with TestClient(create_app(cfg)) as c:\n"
            "    r = c.post('/classify?top_k=10', content=png.getvalue())\n"
            "    print(r.status_code, r.json()['predictions'][0]['class_id'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if "RUNTIME-NEEDS-TORCH" in proc.stdout:
        pytest.skip("g2gserve.runtime still imports torch (the slim runtime of issue 18 is not in this tree yet)")
    assert proc.returncode == 0 and proc.stdout.startswith("200"), proc.stderr[-2000:]


def test_admission_reservations_are_released_whatever_the_answer(export_dir):
    app = _app(export_dir, calibrate=False)
    with TestClient(app) as c:
        batcher = app.state.service.batcher
        assert c.post("/classify?top_k=0", content=_png()).status_code == 422  # refused before the endpoint runs
        assert c.post("/classify", content=b"junk").status_code == 415
        assert c.post("/classify", content=b"\0", headers={"x-shape": "2,28,28"}).status_code == 422
        assert c.post("/classify", content=_png()).status_code == 200
        assert batcher.pending_images == 0 and batcher._decoding == 0


def test_servebench_page_names_the_machine_and_judges_every_target(tmp_path, monkeypatch, capsys):
    from server import servebench
    monkeypatch.setattr(servebench.shutil, "which", lambda name: None)
    assert servebench.main([str(tmp_path)]) == 2 and "apt-get install -y wrk" in capsys.readouterr().err
    def runs(s, n):  # two rounds; the machine 10% faster in the second, so only paired ratios stay exact
        rps = 1000.0 * (2 if s == "ceiling" else 1)
        return [dict(rps=rps * f, ok_rps=rps * f, p50_ms=1.0 / f, p99_ms=5.0, non_2xx=0,
                     images_per_s=n * 1000.0 * f * (1 if s != "dense" else 0.5)) for f in (1.0, 1.1)]
    cells = [dict(server=s, kind=k, connections=c, images=n, **servebench._median_cell(runs(s, n)))
             for s in ("ceiling", "sparse", "dense") for k, n in servebench.KINDS.items() for c in (1, 32)]
    lat = lambda p50, p99: {"count": 10, "p50_ms": p50, "p99_ms": p99}  # noqa: E731
    run = lambda accepted, refused, **kw: dict(  # noqa: E731
        accepted=accepted, refused=refused, answers_per_s=4000.0, accepted_per_s=10.0, other_status=0, other_5xx=0,
        transport_errors=0, **kw)
    result = {"cells": cells, "rounds": 2, "connections": (1, 32), "command": "python -m server.servebench X", "model": "X",
              "backend": "fused", "seconds": 1, "pinned": True, "wrk": "wrk 4.1",
              "machine": {"cpu": "Test CPU", "isa": "AVX2", "cores": 2},
              "overload": {"connections": 256, "seconds": 1, "factor": 4.0, "capacity_per_s": 10.0,
                           "after": {"statuses": [200], **lat(1, 1)},
                           "storm": run(lat(10, 20), lat(60, 300), little_ms=64.0),
                           "paced": run(lat(10, 200), lat(1, 2), offered_per_s=40.0, not_sent=0)},
              "healthz": {"healthz": lat(0.2, 30), "large_requests": lat(900, 900), "large_statuses": [200]}}
    result["targets"] = servebench.targets(result)
    verdict = {t["target"].split(":")[0]: t["met"] for t in result["targets"]}
    overload = {t["target"]: t["met"] for t in result["targets"] if "overload" in t["target"]}
    assert verdict["32 connections, single PNG"] is True  # 50% of the ceiling
    assert verdict["1 connection"] is True and verdict["64-image requests (png64)"] is True
    assert [met for name, met in overload.items() if "accepted p99" in name] == [False]  # 200 ms > 10 x 10 ms
    assert sum(overload.values()) == 3  # paced refusals fast (the storm's 300 ms is only shown), no 5xx, recovery
    assert verdict["64 large images in flight"] is False  # /healthz p99 30 ms
    page = servebench.markdown(result)
    assert "Test CPU (AVX2, 2 cores)" in page and page.count("| **no** |") == 2
    assert "| 2.00x (range 2.00x–2.00x) |" in page and "50% (range 50%–50%)" in page
    assert "| sparse | retry storm | as answered | 4,000 | 10 | 10.0 / 20.0 | 10 | 60.0 / 300.0 | 64.0 |" in page
    assert "| sparse | paced 4x | 40 | 4,000 | 10 | 10.0 / 200.0 | 10 | 1.0 / 2.0 |" in page


def _exchange_raw(sock, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on an open socket; (status, headers, body) of the answer (Content-Length bodies only)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_protocol_refuses_before_the_app_and_keeps_the_connection(export_dir, monkeypatch):
    import json
    import socket

    from server import protocol
    from test_hardening import _serve
    monkeypatch.setenv(protocol.ENV, "{}")  # configure() writes it; restored after the test
    app = _app(export_dir, max_batch=1, max_wait_ms=0, max_queue_ms=20, calibrate=False)
    server, thread, port = _serve(app, http=protocol.configure(1.0, 16 * 1024))
    try:
        service = app.state.service
        real, admitted = service.batcher.predict, []
        monkeypatch.setattr(service.batcher, "predict", lambda x: (time.sleep(0.5), real(x))[1])
        real_admit = service.batcher.admit
        monkeypatch.setattr(service.batcher, "admit", lambda n=1: (admitted.append(n), real_admit(n))[1])
        service.batcher.cost.observe(1, 0.5)
        url = f"http://127.0.0.1:{port}/classify"
        slow = threading.Thread(target=lambda: httpx.post(url, content=_png(), timeout=10))
        slow.start()
        while service.batcher.pending_images == 0:
            time.sleep(0.01)
        png = _png(1)
        post = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
                .encode() + png)
        big = png + b"\0" * (40 * 1024)  # a body larger than the header limit is no header
        big_post = post.replace(f"Length: {len(png)}".encode(), f"Length: {len(big)}".encode())[:-len(png)] + big
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for request in (post, big_post):  # the body is read and discarded: the next request is parsed
                t = time.perf_counter()
                status, headers, body = _exchange_raw(sock, request)
                assert time.perf_counter() - t < 0.4 and status == 503  # at once, not after the 0.5 s pass
                assert headers["content-type"] == "application/json" and int(headers["retry-after"]) >= 1
                assert "connection" not in headers and json.loads(body)["detail"].startswith("server busy")
            assert admitted == [1]  # only the slow request reached the app's gate: the refusals never did
            assert _exchange_raw(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
            slow.join()
            status, _, body = _exchange_raw(sock, post)  # the queue is free again: admitted on the same connection
            assert status == 200 and json.loads(body)["predictions"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # a body it will not wait for
            slow = threading.Thread(target=lambda: httpx.post(url, content=_png(), timeout=10))
            slow.start()
            while service.batcher.pending_images == 0:
                time.sleep(0.01)
            chunked = b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n"
            status, headers, _ = _exchange_raw(sock, chunked)
            assert status == 503 and headers["connection"] == "close" and sock.recv(10) == b""
            with socket.create_connection(("127.0.0.1", port), timeout=5) as short:  # a body that never comes
                status, _, _ = _exchange_raw(short, post[:-10])
                t = time.perf_counter()
                assert status == 503 and short.recv(10) == b""  # its body is waited for 1 s (the header bound)
                assert 0.5 < time.perf_counter() - t < 3
            slow.join()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert _counter(metrics, "g2g_rejected_total") == 4
        assert _counter(metrics, 'g2g_requests_total{path="/classify",status="503"}') == 4
        assert _counter(metrics, 'g2g_requests_total{path="/classify",status="200"}') == 3
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_protocol_refusals_reach_the_counters_without_a_scrape():
    """Counted in an int on the hot path; in the Prometheus counters within FLUSH_S (other workers' scrapes)."""
    import types

    from server import admission
    from server.metrics import Metrics
    metrics = Metrics(8)
    early = admission.EarlyAdmission(types.SimpleNamespace(metrics=metrics))

    async def main():
        for _ in range(3):
            early.count()
        before = metrics.registry.get_sample_value("g2g_rejected_total")
        await asyncio.sleep(admission.FLUSH_S + 0.2)
        return before, metrics.registry.get_sample_value("g2g_rejected_total")
    assert asyncio.run(main()) == (0, 3)
    assert metrics.registry.get_sample_value("g2g_requests_total", {"path": "/classify", "status": "503"}) == 3


def test_live_window_keeps_the_last_requests_in_order_without_growing():
    from server.service import LiveWindow
    window = LiveWindow(4)
    assert window.rows().shape == (0, 6)
    for i in range(10):
        window.append(i, 1, 0.1, 0, 0, 0)
    rows = window.rows()
    assert rows[:, 0].tolist() == [6, 7, 8, 9]  # the last four, oldest first


def test_requests_that_arrive_together_share_one_forward_pass():
    """Even with the model idle, a request goes through the worker: those that arrived with it join its pass."""
    calls = []

    async def main():
        b = MicroBatcher(lambda x: (calls.append(len(x)), _echo(x))[1], max_batch=8, max_wait_s=0.0,
                         max_queue_images=64)
        b.start()
        results = await asyncio.gather(*(b.submit(np.full((1, 1, 2, 2), i, np.uint8)) for i in range(6)))
        await b.drain()
        return results
    results = asyncio.run(main())
    assert calls == [6] and [r.probs[0, 0] for r in results] == list(range(6))


def test_classify_takes_the_hot_route_and_answers_as_the_router_would(export_dir):
    from server.hotpath import HotRoute
    app = _app(export_dir, calibrate=False)
    assert any(m.cls is HotRoute for m in app.user_middleware)
    with TestClient(app) as c:
        ok = c.post("/classify?top_k=2", content=_png())
        assert ok.status_code == 200 and len(ok.json()["predictions"][0]["top_k"]) == 2
        for query, kind in (("top_k=0", "out_of_range"), ("top_k=two", "int_parsing")):  # FastAPI's 422 shape
            bad = c.post(f"/classify?{query}", content=_png())
            assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["query", "top_k"], bad.text
            assert bad.json()["errors"][0]["type"] == kind
        assert c.post("/classify", content=b"junk").status_code == 415  # an HTTPException, by the app's handler
        assert c.get("/classify").status_code == 405  # other methods: the router
        metrics = c.get("/metrics").text
        assert 'g2g_requests_total{path="/classify",status="200"} 1.0' in metrics
        assert 'g2g_requests_total{path="/classify",status="422"} 2.0' in metrics
        spec = c.get("/openapi.json").json()["paths"]["/classify"]["post"]
        assert {p["name"] for p in spec["parameters"]} == {"top_k", "shape"}
    guarded = _app(export_dir, calibrate=False, api_key="k")  # a dependency: the usual way, which checks it
    assert not any(m.cls is HotRoute for m in guarded.user_middleware)
    with TestClient(guarded) as c:
        assert c.post("/classify", content=_png()).status_code == 401
        assert c.post("/classify", content=_png(), headers={"X-API-Key": "k"}).status_code == 200
