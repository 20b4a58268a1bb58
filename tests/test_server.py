import asyncio
import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the server extra is not installed (core-only environment, e.g. a GPU box)")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from g2gserve.export import export_checkpoint
from g2gserve.data.images import encode_png
from g2gserve.runtime import load
from server.app import ServeConfig, create_app
from server.batching import MicroBatcher, QueueFull
from server.loadtest import loopback_only

from live import free_port as _free_port, start_server  # noqa: F401 - _free_port is imported by others
from test_export import _checkpoint


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    _, _, path = _checkpoint(tmp, granularity="block")
    export_checkpoint(path, tmp / "exp")
    return tmp / "exp"


def _png(seed=0, size=(28, 28), mode="L"):
    gen = torch.Generator().manual_seed(seed)
    if mode == "L":
        return encode_png(torch.randint(0, 256, (1, *size), generator=gen, dtype=torch.uint8))
    return encode_png(torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8))


def _app(export_dir, **kw):
    return create_app(ServeConfig(model=str(export_dir), device="cpu", calibration_seconds=0.05,
                                  memory_probe=False, **kw))


@pytest.fixture
def client(export_dir):
    with TestClient(_app(export_dir)) as c:
        yield c


def test_classify_all_body_kinds_and_offline_equality(client, export_dir):
    offline = load(export_dir)
    imgs = [_png(i) for i in range(3)]
    expected = offline.predict(torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(b))))[None]
                                            for b in imgs]))
    raw = client.post("/classify", content=imgs[0], headers={"content-type": "image/png"}).json()
    multi = client.post("/classify?top_k=10", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs)]).json()
    js = client.post("/classify", json={"images": [base64.b64encode(b).decode() for b in imgs]}).json()
    assert raw["predictions"][0]["class_id"] == int(expected[0].argmax())
    assert len(multi["predictions"]) == 3 and len(multi["predictions"][0]["top_k"]) == 10
    for i, pred in enumerate(multi["predictions"]):
        probs = {s["class_id"]: s["probability"] for s in pred["top_k"]}
        assert all(abs(probs[c] - float(expected[i, c])) < 1e-5 for c in range(10))
    assert [p["class_id"] for p in js["predictions"]] == [int(e.argmax()) for e in expected]
    assert raw["model"]["name"] and raw["model"]["version"] and raw["latency_ms"] >= raw["inference_ms"] >= 0


def test_any_size_and_mode_is_converted(client):
    for body in (_png(1, (100, 60), "RGB"), _png(2, (10, 10))):
        assert client.post("/classify", content=body).status_code == 200
    for fmt in ("JPEG", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format=fmt)
        assert client.post("/classify", content=buf.getvalue()).status_code == 200, fmt
    rgba = io.BytesIO()
    Image.new("RGBA", (28, 28)).save(rgba, format="PNG")
    assert client.post("/classify", content=rgba.getvalue()).status_code == 200


def test_bad_input_never_500(export_dir):
    with TestClient(_app(export_dir, max_pixels=10_000, max_body_bytes=200_000, max_images_per_request=4)) as c:
        gif = io.BytesIO()
        Image.new("L", (8, 8)).save(gif, format="GIF")
        cases = [
            (dict(content=b"definitely not an image"), 415),
            (dict(content=_png()[:60]), 422),
            (dict(content=gif.getvalue()), 415),
            (dict(content=b""), 422),
            (dict(content=_png(0, (200, 200))), 413),  # 40,000 pixels > limit: refused before decoding
            (dict(content=b"x" * 300_000), 413),
            (dict(content=b"{not json", headers={"content-type": "application/json"}), 422),
            (dict(json={"image": "***"}), 422),
            (dict(json={"picture": "abc"}), 422),
            (dict(files=[("other", ("a.png", _png(), "image/png"))]), 422),
            (dict(files=[("file", (f"{i}.png", _png(), "image/png")) for i in range(5)]), 413),
        ]
        for kwargs, status in cases:
            r = c.post("/classify", **kwargs)
            assert r.status_code == status, (kwargs.keys(), r.text)
            assert "detail" in r.json()
        assert c.post("/classify?top_k=0", content=_png()).status_code == 422
        assert c.get("/healthz").status_code == 200  # still up


def test_endpoints_stats_and_metrics(export_dir):
    with TestClient(_app(export_dir, admin_token="t0ken")) as client:
        _check_endpoints_stats_and_metrics(client)


def _check_endpoints_stats_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    assert client.get("/model").json()["format"] == "g2gserve.export"
    assert client.get("/docs").status_code == 200 and "/classify" in client.get("/openapi.json").json()["paths"]
    client.post("/classify", content=_png())
    stats = client.post("/stats/calibrate", headers={"Authorization": "Bearer t0ken"}).json()
    assert stats["status"] == "done" and stats["latency"]["batch_1"]["speedup"] > 0
    assert stats["weights"]["ratio"] < 0.5 and "as fast as its dense twin" in stats["summary"]
    live = client.get("/stats").json()["live"]
    assert live["requests"] >= 1 and live["latency_ms"]["p99"] >= live["latency_ms"]["p50"] > 0
    client.post("/classify", content=b"junk")
    text = client.get("/metrics").text
    for name in ("g2g_request_latency_seconds_bucket", "g2g_inference_latency_seconds_bucket", "g2g_batch_size_bucket",
                 "g2g_queue_depth", 'g2g_requests_total{path="/classify",status="200"}',
                 'g2g_errors_total{path="/classify",status="415"}', "process_resident_memory_bytes", "g2g_model_info"):
        assert name in text, name


def test_microbatcher_batches_and_matches_unbatched():
    calls = []

    def predict(x):
        calls.append(len(x))
        time.sleep(0.01)
        return np.repeat(x.astype(np.float32).mean((1, 2, 3))[:, None], 2, axis=1)

    async def main():
        b = MicroBatcher(predict, max_batch=8, max_wait_s=0.05, max_queue_images=64)
        b.start()
        xs = [np.full((1, 1, 2, 2), i, dtype=np.uint8) for i in range(12)]
        results = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.drain()
        return xs, results

    xs, results = asyncio.run(main())
    assert max(calls) == 8 and sum(calls) == 12  # batched, never above max_batch
    for x, r in zip(xs, results):
        assert np.array_equal(r.probs, predict(x))


def test_queue_full_is_refused_and_drain_finishes_in_flight():
    async def main():
        b = MicroBatcher(lambda x: (time.sleep(0.2), x.astype(np.float32).reshape(len(x), -1))[1], max_batch=2,
                         max_wait_s=0.0, max_queue_images=2)
        b.start()
        first = asyncio.create_task(b.submit(np.zeros((2, 1, 1, 1), dtype=np.uint8)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(np.zeros((1, 1, 1, 1), dtype=np.uint8))
        await b.drain()  # graceful: the in-flight request completes
        return await first

    assert asyncio.run(main()).probs.shape == (2, 1)


def test_queue_full_answers_503_with_retry_after(export_dir, monkeypatch):
    app = _app(export_dir, max_batch=1, max_queue_images=1, max_wait_ms=0)
    with TestClient(app) as c:
        service = app.state.service
        real = service.predict
        monkeypatch.setattr(service.batcher, "predict", lambda x: (time.sleep(0.3), real(x))[1])
        statuses = []

        def hit():
            r = c.post("/classify", content=_png())
            statuses.append((r.status_code, r.headers.get("retry-after")))
        threads = [threading.Thread(target=hit) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert (503, "1") in statuses and (200, None) in statuses


def _start(app):
    """uvicorn on a free loopback port in a thread; returns (url, server, thread) once /readyz answers."""
    server, thread, port = start_server(app)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture
def live_server(export_dir):
    url, server, thread = _start(_app(export_dir, max_body_bytes=100_000, max_batch=16, max_wait_ms=200))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_real_http_concurrency_and_streamed_oversize(live_server, export_dir):
    offline = load(export_dir)
    imgs = [_png(i) for i in range(24)]

    async def fire():
        async with httpx.AsyncClient() as c:
            return await asyncio.gather(*(c.post(f"{live_server}/classify?top_k=10", content=b) for b in imgs))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    import numpy as np
    batch = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b))))[None] for b in imgs])
    expected = offline.predict(batch)
    for r, e in zip(responses, expected):
        probs = {s["class_id"]: s["probability"] for s in r.json()["predictions"][0]["top_k"]}
        assert max(abs(probs[c] - float(e[c])) for c in range(10)) < 1e-5
    metrics = httpx.get(f"{live_server}/metrics").text
    count_line = next(l for l in metrics.splitlines() if l.startswith("g2g_batch_size_count"))
    assert float(count_line.split()[1]) < 24  # some requests shared a forward pass

    def chunks():  # no Content-Length: chunked transfer, cut off by counting
        for _ in range(50):
            yield b"x" * 10_000
    r = httpx.post(f"{live_server}/classify", content=chunks())
    assert r.status_code == 413
    assert httpx.get(f"{live_server}/healthz").status_code == 200


def test_loadtest_refuses_other_hosts():
    loopback_only("http://127.0.0.1:8000")
    loopback_only("http://localhost:1")
    with pytest.raises(ValueError, match="not a loopback"):
        loopback_only("http://10.1.2.3:8000")


def test_graceful_shutdown_lets_in_flight_requests_finish(export_dir):
    app = _app(export_dir, max_wait_ms=0)
    url, server, thread = _start(app)
    service = app.state.service
    real = service.predict
    service.batcher.predict = lambda x: (time.sleep(0.5), real(x))[1]
    result = {}
    client = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}/classify", content=_png(), timeout=10)))
    client.start()
    time.sleep(0.2)  # the request is inside the slow forward pass
    server.should_exit = True  # what SIGTERM does
    client.join()
    thread.join(timeout=10)
    assert result["r"].status_code == 200 and not thread.is_alive()


@pytest.mark.parametrize("backend", ["onnxruntime", "fused"])
def test_cpu_backends_serve_the_same_predictions(export_dir, backend):
    with TestClient(_app(export_dir, backend=backend)) as other_client, TestClient(_app(export_dir)) as torch_client:
        body = _png(5)
        a = other_client.post("/classify?top_k=10", content=body).json()
        b = torch_client.post("/classify?top_k=10", content=body).json()
        assert a["model"]["backend"] == backend and b["model"]["backend"] == "torch"
        pa = {s["class_id"]: s["probability"] for s in a["predictions"][0]["top_k"]}
        pb = {s["class_id"]: s["probability"] for s in b["predictions"][0]["top_k"]}
        assert max(abs(pa[c] - pb[c]) for c in range(10)) < 1e-5


def test_serve_cli_refuses_bad_models_before_starting(tmp_path, capsys):
    from server.cli import main
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "exp").mkdir()
    assert main([str(tmp_path / "exp")]) == 2
    assert "incomplete export" in capsys.readouterr().err


def test_serves_the_fused_backend_at_int8_static_scales(tmp_path, idx_dir):
    """g2g-serve --backend fused --dtype int8-static: the export's calibrated scales, answers close to fp32."""
    from g2gserve.model.checkpoint import save_checkpoint
    from g2gserve.runtime.fused import host_isa, supported
    if not supported(host_isa(), "int8"):
        pytest.skip("int8 needs AVX512-VNNI, which this CPU lacks")
    _, ckpt, path = _checkpoint(tmp_path, granularity="block", block_size=16, conv_channels=32)
    ckpt.meta["dataset"] = "fashion-mnist"
    save_checkpoint(path, ckpt)
    export_checkpoint(path, tmp_path / "exp", data_dir=idx_dir)
    imgs = [_png(i) for i in range(4)]
    pixels = np.stack([np.array(Image.open(io.BytesIO(b)))[None] for b in imgs])
    expected = load(tmp_path / "exp", backend="fused").predict(pixels)
    with TestClient(_app(tmp_path / "exp", backend="fused", dtype="int8-static", calibrate=False)) as c:
        got = c.post("/classify?top_k=10", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs)])
        assert got.status_code == 200
        for i, pred in enumerate(got.json()["predictions"]):
            probs = {s["class_id"]: s["probability"] for s in pred["top_k"]}
            assert max(abs(probs[k] - float(expected[i, k])) for k in range(10)) < 0.05
        assert c.get("/stats").json()["config"]["dtype"] == "int8-static"
