"""The v2 (Open Inference Protocol) REST endpoints over a :class:`ModelRepository`, and the page at ``/``.

Every error answers ``{"error": "..."}`` with a 4xx status (503 + Retry-After when the queue is full).
Inference goes through the served version's micro-batcher, so v2 and ``/classify`` requests share
forward passes, queue limits and metrics.
"""
from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

import g2gserve
from g2gserve.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image

from ..batching import QueueFull
from .protocol import (EXTENSIONS, OIPError, encode_infer_response, model_config, model_metadata,
                       parse_infer_request)
from .repository import ModelRepository

STATIC = Path(__file__).parent / "static"


@dataclass
class V2Settings:
    max_images: int = 64
    max_batch: int = 32  # reported as max_batch_size in the Triton model configuration
    max_pixels: int = DEFAULT_MAX_PIXELS
    admin_token: str | None = None  # load/unload need "Authorization: Bearer <token>"; refused without one
    on_request: Callable[[float, float], None] | None = None  # (latency_s, inference_s) of a served request


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def check_admin(request: Request, token: str | None) -> None:
    """Refuse repository changes unless the server has an admin token and the request carries it."""
    if not token:
        raise OIPError(403, "loading and unloading models is disabled: start the server with an admin token")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise OIPError(401, "loading and unloading models needs the header 'Authorization: Bearer <admin token>'")


def build_router(repo: Callable[[], ModelRepository | None], settings: V2Settings) -> APIRouter:
    """v2 endpoints; ``repo()`` returns the repository (None until the server has started)."""
    router = APIRouter(tags=["Open Inference Protocol (v2)"])

    def repository() -> ModelRepository:
        r = repo()
        if r is None:
            raise OIPError(503, "the server is starting")
        return r

    async def guarded(fn, *args):
        try:
            return await fn(*args)
        except OIPError as e:
            return _error(e.status, str(e), {"Retry-After": "1"} if e.status == 503 else None)

    @router.get("/v2")
    async def server_metadata():
        """Server name, version and protocol extensions."""
        return {"name": "g2gserve", "version": g2gserve.__version__, "extensions": list(EXTENSIONS)}

    @router.get("/v2/health/live")
    async def live():
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready():
        """Ready once the start-up models are loaded and warmed."""
        r = repo()
        if r is None or not r.served:
            return _error(503, "no model is loaded yet", {"Retry-After": "1"})
        return {"ready": True}

    async def _model_ready(name: str, version: str | None):
        served = repository().get(name, version)
        return {"name": served.name, "version": served.version, "ready": True}

    async def _metadata(name: str, version: str | None):
        r = repository()
        served = r.get(name, version)
        m = served.model
        return model_metadata(served.name, [served.version], f"g2gserve_{m.backend}", m.input_shape, m.classes)

    async def _config(name: str, version: str | None):
        served = repository().get(name, version)
        m = served.model
        return model_config(served.name, f"g2gserve_{m.backend}", m.input_shape, m.classes, settings.max_batch)

    @router.get("/v2/models/{name}/config")
    async def config(name: str):
        """Triton's model configuration (for perf_analyzer and other Triton tools)."""
        return await guarded(_config, name, None)

    @router.get("/v2/models/{name}/versions/{version}/config")
    async def version_config(name: str, version: str):
        return await guarded(_config, name, version)

    @router.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        return await guarded(_model_ready, name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str):
        return await guarded(_model_ready, name, version)

    @router.get("/v2/models/{name}")
    async def metadata(name: str):
        """Inputs (UINT8 pixels or BYTES encoded images), output (FP32 probabilities), class names."""
        return await guarded(_metadata, name, None)

    @router.get("/v2/models/{name}/versions/{version}")
    async def version_metadata(name: str, version: str):
        return await guarded(_metadata, name, version)

    async def _infer(name: str, version: str | None, request: Request):
        start = time.perf_counter()
        body = await request.body()
        async with repository().hold(name, version) as served:
            model = served.model
            req = parse_infer_request(body, request.headers.get("inference-header-content-length"),
                                      model.input_shape, settings.max_images)
            if req.pixels is not None:
                images = torch.from_numpy(req.pixels)
            else:
                try:
                    images = torch.stack([decode_image(b, model.input_shape, settings.max_pixels)
                                          for b in req.encoded])
                except ImageError as e:
                    raise OIPError(e.status, str(e))
            try:
                result = await served.batcher.submit(images)
            except QueueFull as e:
                raise OIPError(503, f"server busy: {e}")
            latency = time.perf_counter() - start
            timing = {"latency_ms": latency * 1e3, "queue_ms": result.queue_s * 1e3,
                      "inference_ms": result.inference_s * 1e3}
            content, headers = encode_infer_response(req, served.name, served.version, np.asarray(result.probs),
                                                     model.classes, timing)
        if settings.on_request:
            settings.on_request(latency, result.inference_s)
        return Response(content, headers=headers)

    infer_body = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}},
                                              "application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}}}

    @router.post("/v2/models/{name}/infer", openapi_extra=infer_body)
    async def infer(name: str, request: Request):
        """v2 inference: JSON tensors, or a JSON header plus binary tensors (Inference-Header-Content-Length)."""
        return await guarded(_infer, name, None, request)

    @router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=infer_body)
    async def infer_version(name: str, version: str, request: Request):
        return await guarded(_infer, name, version, request)

    async def _index(request: Request):
        body = await request.body()
        rows = repository().index()
        if body.strip():
            try:
                ready_only = bool(json.loads(body).get("ready", False))
            except (ValueError, AttributeError):
                raise OIPError(400, 'the index request body must be a JSON object like {"ready": true}')
            if ready_only:
                rows = [r for r in rows if r["state"] == "READY"]
        return rows

    @router.post("/v2/repository/index")
    async def index(request: Request):
        """Every model version in the repository with its state (READY, UNAVAILABLE, LOADING, UNLOADING)."""
        return await guarded(_index, request)

    async def _load(name: str, request: Request):
        check_admin(request, settings.admin_token)
        served = await repository().load(name)
        return {"name": served.name, "version": served.version, "state": "READY"}

    async def _unload(name: str, request: Request):
        check_admin(request, settings.admin_token)
        await repository().unload(name)
        return {"name": name, "state": "UNAVAILABLE"}

    @router.post("/v2/repository/models/{name}/load")
    async def load_model(name: str, request: Request):
        """Serve the latest version on disk; if another version is served, warm the new one, switch, drain the
        old one (admin token)."""
        return await guarded(_load, name, request)

    @router.post("/v2/repository/models/{name}/unload")
    async def unload_model(name: str, request: Request):
        """Stop serving a model once its in-flight requests are done (admin token)."""
        return await guarded(_unload, name, request)

    @router.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @router.get("/ui/app.js", include_in_schema=False)
    async def page_script():
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    return router


__all__ = ["build_router", "V2Settings", "check_admin"]
