"""The FastAPI app: ``create_app(ServeConfig(...))``, usable by uvicorn, tests and any ASGI server."""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info,
                               ProcessCollector, generate_latest)
from pydantic import BaseModel

from g2gserve.bench.measure import Latency, interleaved, pairwise_speedup, peak_memory
from g2gserve.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from g2gserve.runtime import load

from .batching import MicroBatcher, QueueFull
from .auth import add_admin_routes, api_key_dependencies
from .errors import error_responses
from .hardening import harden
from .limits import BodyLimitMiddleware
from .parsing import JSONRejected, classify_request_body, parse_json

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class ServeConfig:
    model: str
    backend: str = "torch"
    device: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue_images: int = 512
    max_body_bytes: int = 10 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images_per_request: int = 64
    threads: int | None = None
    calibrate: bool = True  # time sparse vs dense at start-up (in the background)
    calibration_seconds: float = 1.0
    memory_probe: bool = True  # peak RSS of fresh sparse/dense processes during calibration
    admin_token: str | None = None  # POST /stats/calibrate exists only with a token (server/auth.py)
    api_key: str | None = None  # required in X-API-Key for /classify when set
    cors_origins: tuple[str, ...] = ()
    body_timeout_s: float = 30.0  # the whole request body within (408)
    request_timeout_s: float = 60.0  # the whole answer within (503)

    SECRETS = ("admin_token", "api_key")

    def public(self) -> dict:
        """The config as /stats shows it: secrets only as whether they are set."""
        return {k: (v is not None if k in self.SECRETS else v) for k, v in asdict(self).items()}

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_queue_images < self.max_batch:
            raise ValueError("need max_batch >= 1, max_wait_ms >= 0 and max_queue_images >= max_batch")


# ------------------------------------------------------------------ response models (OpenAPI docs)
class ClassScore(BaseModel):
    class_id: int
    label: str
    probability: float


class Prediction(BaseModel):
    class_id: int
    label: str
    probability: float
    top_k: list[ClassScore]


class ClassifyResponse(BaseModel):
    model: dict[str, Any]
    predictions: list[Prediction]
    latency_ms: float
    queue_ms: float
    inference_ms: float


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.request_latency = Histogram("g2g_request_latency_seconds", "POST /classify latency, queue + inference + "
                                         "decoding", buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram("g2g_inference_latency_seconds", "one batched forward pass",
                                           buckets=LATENCY_BUCKETS, registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch_size = Histogram("g2g_batch_size", "images per forward pass", buckets=buckets, registry=r)
        self.queue_depth = Gauge("g2g_queue_depth", "images waiting for a forward pass", registry=r)
        self.requests = Counter("g2g_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.errors = Counter("g2g_errors", "HTTP responses with status >= 400", ["path", "status"], registry=r)
        self.model_info = Info("g2g_model", "the served model", registry=r)


def _model_version(manifest: dict) -> str:
    sha = manifest.get("source", {}).get("sha256") or manifest.get("files", {}).get("weights.safetensors", {}).get("sha256")
    return sha[:12] if sha else "in-memory"


class Service:
    """Everything the endpoints share: the model, the batcher, metrics, live latencies, calibration."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.model = None
        self.batcher: MicroBatcher | None = None
        self.metrics = Metrics(cfg.max_batch)
        self.ready = False
        self.live = collections.deque(maxlen=10_000)  # (latency_s, inference_s) of served requests
        self.calibration: dict = {"status": "pending"}
        self._calibration_lock = threading.Lock()

    def load(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.model = load(self.cfg.model, backend=self.cfg.backend, device=self.cfg.device, threads=self.cfg.threads)
        warm = torch.zeros(self.cfg.max_batch, *self.model.input_shape, dtype=torch.uint8)
        for n in (1, self.cfg.max_batch):
            self.model.predict(warm[:n])
        m = self.model
        self.metrics.model_info.info({"name": m.name, "version": _model_version(m.manifest), "backend": m.backend,
                                      "device": str(m.device),
                                      "formats": ",".join(l["format"] for l in m.manifest["layers"])})

    @property
    def model_card(self) -> dict:
        m = self.model
        return {"name": m.name, "version": _model_version(m.manifest), "backend": m.backend, "device": str(m.device)}

    def on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.inference_latency.observe(seconds)

    # -------------------------------------------------------------- calibration
    def run_calibration(self) -> dict:
        """Time sparse vs dense at batch 1 and max batch (interleaved), measure weights and peak RSS."""
        self._calibration_lock.acquire()  # one at a time: a second request waits, then measures afresh
        try:
            self.calibration = {"status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            cfg, sparse = self.cfg, self.model
            dense = load(cfg.model, backend=cfg.backend, device=str(sparse.device), variant="dense", threads=cfg.threads)
            timing = {}
            for n in sorted({1, cfg.max_batch}):
                x = sparse.preprocess(torch.zeros(n, *sparse.input_shape, dtype=torch.uint8))
                times = interleaved({"sparse": lambda: sparse.logits(x), "dense": lambda: dense.logits(x)},
                                    seconds=cfg.calibration_seconds,
                                    device=sparse.device if cfg.backend == "torch" else None)
                s, d = Latency.of(times["sparse"]), Latency.of(times["dense"])
                timing[f"batch_{n}"] = {"sparse_p50_ms": s.p50_ms, "dense_p50_ms": d.p50_ms,
                                        "sparse_p99_ms": s.p99_ms, "dense_p99_ms": d.p99_ms,
                                        "speedup": pairwise_speedup(times["sparse"], times["dense"])}
            del dense
            sizes = sparse.manifest["sizes"]
            result: dict[str, Any] = {
                "status": "done", "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "threads": torch.get_num_threads(), "latency": timing,
                "weights": {"sparse_bytes": sizes["stored_weight_bytes"], "dense_bytes": sizes["dense_weight_bytes"],
                            "ratio": sizes["stored_weight_bytes"] / sizes["dense_weight_bytes"]},
            }
            if cfg.memory_probe:
                mem = {v: peak_memory(cfg.model, cfg.backend, v, cfg.max_batch, str(sparse.device), cfg.threads or 1)
                       for v in ("sparse", "dense")}
                result["resident_memory"] = {"sparse_peak_bytes": mem["sparse"]["vmhwm_bytes"],
                                             "dense_peak_bytes": mem["dense"]["vmhwm_bytes"],
                                             "saving_bytes": mem["dense"]["vmhwm_bytes"] - mem["sparse"]["vmhwm_bytes"]}
            b1, bm = timing["batch_1"], timing[f"batch_{cfg.max_batch}"]
            result["summary"] = (
                f"on this machine the sparse model is {b1['speedup']:.2f}x as fast as its dense twin at batch 1 and "
                f"{bm['speedup']:.2f}x at batch {cfg.max_batch}, and stores {result['weights']['ratio']:.2f}x the "
                f"weight bytes" + (f"; a fresh process serving it peaks {result['resident_memory']['saving_bytes'] / 2**20:.1f}"
                                   f" MiB lower" if "resident_memory" in result else ""))
            self.calibration = result
        except Exception as e:  # noqa: BLE001 - reported in /stats, never takes the server down
            self.calibration = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        finally:
            self._calibration_lock.release()
        return self.calibration

    def live_stats(self) -> dict:
        data = list(self.live)
        if not data:
            return {"requests": 0}
        lat, inf = Latency.of([d[0] for d in data]), Latency.of([d[1] for d in data])
        return {"requests": len(data), "latency_ms": {"p50": lat.p50_ms, "p95": lat.p95_ms, "p99": lat.p99_ms},
                "inference_ms": {"p50": inf.p50_ms, "p95": inf.p95_ms, "p99": inf.p99_ms}}


# ------------------------------------------------------------------ request parsing
async def _image_payloads(request: Request, max_images: int) -> list[bytes]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=max_images + 1)
        files = [f for f in form.getlist("file") if hasattr(f, "read")]
        if not files:
            raise HTTPException(422, "multipart upload needs one or more 'file' fields")
        payloads = [await f.read() for f in files]
    elif ctype == "application/json":
        try:  # bounded depth, number length and value count before the parser runs
            body = parse_json(await request.body())
        except JSONRejected as e:
            raise HTTPException(e.status, str(e))
        if not isinstance(body, dict) or not ({"image", "images"} & set(body)):
            raise HTTPException(422, 'JSON body must be {"image": "<base64>"} or {"images": ["<base64>", ...]}')
        items = body.get("images", [body.get("image")])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise HTTPException(422, "images must be base64 strings")
        try:
            payloads = [base64.b64decode(i, validate=True) for i in items]
        except (binascii.Error, ValueError) as e:
            raise HTTPException(422, f"invalid base64 ({e})")
    else:
        payloads = [await request.body()]
    if not payloads or not any(payloads):
        raise HTTPException(422, "empty body: send an image (raw bytes, multipart 'file', or JSON base64)")
    if len(payloads) > max_images:
        raise HTTPException(413, f"{len(payloads)} images in one request; the limit is {max_images}")
    return payloads


def _predictions(probs, classes: list[str], top_k: int) -> list[dict]:
    probs = np.asarray(probs)
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, probs.shape[1])]
    values = np.take_along_axis(probs, indices, 1)
    out = []
    for vals, idx in zip(values.tolist(), indices.tolist()):
        top = [{"class_id": i, "label": classes[i], "probability": v} for v, i in zip(vals, idx)]
        out.append({**top[0], "top_k": top})
    return out


# ------------------------------------------------------------------ the app
def create_app(cfg: ServeConfig) -> FastAPI:
    service = Service(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(service.load)
        service.batcher = MicroBatcher(service.model.predict, cfg.max_batch, cfg.max_wait_ms / 1e3,
                                       cfg.max_queue_images, service.on_batch)
        service.batcher.start()
        service.ready = True
        calibration = asyncio.create_task(asyncio.to_thread(service.run_calibration)) if cfg.calibrate else None
        yield
        service.ready = False
        await service.batcher.drain()  # let in-flight requests finish
        if calibration is not None:
            await calibration

    app = FastAPI(title="g2gserve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image classification with a sparse G2GNet, and what its sparsity saves on this machine.")
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    harden(app, cfg)  # before count_requests, so that it counts the errors the guards answer

    known_paths: set[str] = set()  # filled once the routes exist (below); unknown paths are counted as "other"

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path if request.url.path in known_paths else "other"
        service.metrics.requests.labels(path, str(response.status_code)).inc()
        if response.status_code >= 400:
            service.metrics.errors.labels(path, str(response.status_code)).inc()
        return response

    @app.post("/classify", response_model=ClassifyResponse,
              responses=error_responses(400, *([401] if cfg.api_key else []), 408, 413, 415, 422, 431, 500, 503),
              dependencies=api_key_dependencies(cfg.api_key), openapi_extra={"requestBody": classify_request_body(cfg.max_images_per_request)})
    async def classify(request: Request, top_k: int = Query(3, ge=1, le=1000, description="labels per image")):
        """Classify one or more images (PNG, JPEG, WebP, BMP, TIFF; any size and mode): raw bytes, multipart
        ``file`` fields, or JSON base64. Images are converted to the model's channels and size as in training."""
        start = time.perf_counter()
        if not service.ready:
            raise HTTPException(503, "model is not loaded yet", headers={"Retry-After": "1"})
        payloads = await _image_payloads(request, cfg.max_images_per_request)
        try:
            images = torch.stack([decode_image(p, service.model.input_shape, cfg.max_pixels) for p in payloads])
        except ImageError as e:
            raise HTTPException(e.status, str(e))
        try:
            service.metrics.queue_depth.set(service.batcher.pending_images + len(images))
            result = await service.batcher.submit(images)
        except QueueFull as e:
            raise HTTPException(503, f"server busy: {e}", headers={"Retry-After": "1"})
        finally:
            service.metrics.queue_depth.set(service.batcher.pending_images)
        latency = time.perf_counter() - start
        service.metrics.request_latency.observe(latency)
        service.live.append((latency, result.inference_s))
        return {"model": service.model_card, "predictions": _predictions(result.probs, service.model.classes, top_k),
                "latency_ms": latency * 1e3, "queue_ms": result.queue_s * 1e3, "inference_ms": result.inference_s * 1e3}

    @app.get("/healthz")
    async def healthz():
        """Alive (the process answers)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready: the model is loaded and warmed up."""
        if not service.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "model": service.model_card}

    @app.get("/model")
    async def model_manifest():
        """The export manifest: config, classes, preprocessing, per-layer formats, sizes, parity."""
        if service.model is None:
            raise HTTPException(503, "model is not loaded yet")
        return service.model.manifest

    @app.get("/stats")
    async def stats():
        """What the sparse model saves on this machine (measured against its dense twin) and live latencies."""
        return {"model": service.model_card if service.model else None, "calibration": service.calibration,
                "live": service.live_stats(), "config": cfg.public()}

    add_admin_routes(app, cfg.admin_token, service.run_calibration, lambda: service.model is not None)

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        """Prometheus text format."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    known_paths.update(r.path for r in app.routes)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory server.app:app_from_env`` (several workers): config from $G2G_SERVE_CONFIG."""
    return create_app(ServeConfig(**json.loads(os.environ["G2G_SERVE_CONFIG"])))
