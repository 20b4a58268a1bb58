"""The Open Inference Protocol (KServe v2) REST endpoints, over the service's model repository.

Inference follows ``/classify`` step by step: admission into the served version's batcher before the body
is read (which also keeps that version from being drained under the request), decoding of encoded images in
the decode pool, one shared forward pass, the same metrics. Every error of these routes answers
``{"error": "...", "detail": "..."}``: the protocol's field and the project's (server/errors.py).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any, Awaitable

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

import g2gserve

from ..auth import _same as same_secret
from ..batching import Overloaded
from ..deps import get_service
from ..errors import error_responses
from ..inputs import Body, decode_body
from ..oip.protocol import (EXTENSIONS, OIPError, decompress, encode_infer_response, model_config,
                            model_metadata, parse_infer_request)
from ..schemas import FastJSONResponse
from ..service import Service

router = APIRouter(tags=["Open Inference Protocol (v2)"])  # behind --api-key when one is set, as /classify
health = APIRouter(tags=["Open Inference Protocol (v2)"])  # never behind the key: probes (KServe, Kubernetes)

INFER_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "binary-tensor extension: the JSON request (its length in the "
                                                "Inference-Header-Content-Length header), then the raw tensors"}}}}
FOUND = error_responses(401, 404)
INFER_RESPONSES = {200: {"description": "Probabilities or top-k labels: JSON, or JSON + binary tensors",
                         "content": {"application/json": {}, "application/octet-stream": {}}},
                   **error_responses(400, 401, 404, 408, 413, 415, 422, 503)}


async def _answer(work: Awaitable[Any]) -> Any:
    """Every refusal in the protocol's error shape (plus ``detail``), with its status."""
    try:
        return await work
    except OIPError as e:
        return _error(e.status, str(e), e.headers)
    except HTTPException as e:  # shared helpers (decoding) speak FastAPI's exceptions
        return _error(e.status_code, str(e.detail), e.headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> FastJSONResponse:
    """``error`` for v2 clients; ``detail`` as in every other g2gserve error (server/errors.py's ErrorResponse)."""
    return FastJSONResponse({"error": message, "detail": message}, status_code=status, headers=headers)


def _busy(e: Overloaded) -> OIPError:
    return OIPError(503, f"server busy: {e}", {"Retry-After": str(max(1, math.ceil(e.retry_after)))})


def check_admin(request: Request, service: Service) -> None:
    """Repository changes need the server's admin token as ``Authorization: Bearer <token>``, and one process:
    with ``--workers N`` a request reaches one worker, which would leave the others on the old version."""
    token = service.cfg.admin_token
    if service.cfg.shared_dir:
        raise OIPError(409, "loading and unloading models needs a single worker (each of the --workers has its "
                            "own models); restart the server to change them")
    if not token:
        raise OIPError(403, "loading and unloading models is disabled: start g2g-serve with --admin-token")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not same_secret(given.strip(), token):
        raise OIPError(401, "loading and unloading models needs the header 'Authorization: Bearer <admin token>'")


@health.get("/v2")
async def server_metadata():
    """Server name, version and protocol extensions."""
    return {"name": "g2gserve", "version": g2gserve.__version__, "extensions": list(EXTENSIONS)}


@health.get("/v2/health/live")
async def live():
    return {"live": True}


@health.get("/v2/health/ready", responses=error_responses(503))
async def ready(service: Service = Depends(get_service)):
    """Ready once the start-up models are loaded and warmed up."""
    if not service.ready:
        return _error(503, "the models are not loaded yet", {"Retry-After": "1"})
    return {"ready": True}


async def _model_ready(service: Service, name: str, version: str | None):
    served = service.repository.get(name, version)
    return {"name": served.name, "version": served.version, "ready": True}


async def _metadata(service: Service, name: str, version: str | None):
    served = service.repository.get(name, version)
    m = served.model
    return model_metadata(served.name, [served.version], f"g2gserve_{m.backend}", m.input_shape, m.classes)


async def _config(service: Service, name: str, version: str | None):
    served = service.repository.get(name, version)
    m = served.model
    return model_config(served.name, f"g2gserve_{m.backend}", m.input_shape, m.classes, service.cfg.max_batch)


@router.get("/v2/models/{name}", responses=FOUND)
async def metadata(name: str, service: Service = Depends(get_service)):
    """Inputs (UINT8 pixels or BYTES encoded images), output (FP32 probabilities), class names."""
    return await _answer(_metadata(service, name, None))


@router.get("/v2/models/{name}/versions/{version}", responses=FOUND)
async def version_metadata(name: str, version: str, service: Service = Depends(get_service)):
    return await _answer(_metadata(service, name, version))


@router.get("/v2/models/{name}/config", responses=FOUND)
async def config(name: str, service: Service = Depends(get_service)):
    """Triton's model configuration (for perf_analyzer and other Triton tools)."""
    return await _answer(_config(service, name, None))


@router.get("/v2/models/{name}/versions/{version}/config", responses=FOUND)
async def version_config(name: str, version: str, service: Service = Depends(get_service)):
    return await _answer(_config(service, name, version))


@router.get("/v2/models/{name}/ready", responses=FOUND)
async def model_ready(name: str, service: Service = Depends(get_service)):
    return await _answer(_model_ready(service, name, None))


@router.get("/v2/models/{name}/versions/{version}/ready", responses=FOUND)
async def model_version_ready(name: str, version: str, service: Service = Depends(get_service)):
    return await _answer(_model_ready(service, name, version))


async def _infer(service: Service, name: str, version: str | None, request: Request) -> Response:
    start = time.perf_counter()
    cfg = service.cfg
    served = service.repository.get(name, version)
    model, batcher = served.model, served.batcher
    try:
        ticket = batcher.admit(1)  # before the body is read; holds this version until answered
    except Overloaded as e:
        service.metrics.rejected.inc()
        raise _busy(e)
    req = None

    async def images_of() -> np.ndarray:
        nonlocal req
        body = decompress(await request.body(), request.headers.get("content-encoding"), cfg.max_body_bytes)
        req = parse_infer_request(body, request.headers.get("inference-header-content-length"), model.input_shape,
                                  cfg.max_images_per_request)
        ticket.resize(req.count)
        service.metrics.queue_depth.set(batcher.pending_images)
        decode_start = time.perf_counter()
        if req.pixels is not None:
            images = req.pixels
        else:
            images = await asyncio.get_running_loop().run_in_executor(
                service.decoder, decode_body, Body(payloads=req.encoded), model.input_shape, cfg.max_pixels,
                cfg.max_images_per_request)
        batcher.observe_decode(len(images), time.perf_counter() - decode_start)
        return images

    result, timing = await service.serve_admitted(batcher, ticket, start, images_of, _busy)
    content, headers = encode_infer_response(req, served.name, served.version, result.probs, model.classes, timing)
    return Response(content, headers=headers)


@router.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY, responses=INFER_RESPONSES)
async def infer(name: str, request: Request, service: Service = Depends(get_service)):
    """v2 inference: JSON tensors, or a JSON header plus binary tensors (Inference-Header-Content-Length)."""
    return await _answer(_infer(service, name, None, request))


@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY,
             responses=INFER_RESPONSES)
async def infer_version(name: str, version: str, request: Request, service: Service = Depends(get_service)):
    return await _answer(_infer(service, name, version, request))


async def _index(service: Service, request: Request):
    body = await request.body()
    rows = service.repository.index()
    if body.strip():
        try:
            ready_only = json.loads(body).get("ready", False)
        except (ValueError, AttributeError):
            raise OIPError(400, 'the index request body must be a JSON object like {"ready": true}')
        if ready_only:
            rows = [r for r in rows if r["state"] == "READY"]
    return rows


async def _load(service: Service, name: str, request: Request):
    check_admin(request, service)
    served = await service.repository.load(name)
    return {"name": served.name, "version": served.version, "state": "READY"}


async def _unload(service: Service, name: str, request: Request):
    check_admin(request, service)
    if service.served is not None and service.served.name == name:
        raise OIPError(409, f"{name!r} is the default model (/classify, /model, /stats): load a new version of it "
                            f"instead, or restart with another --default-model")
    await service.repository.unload(name)
    return {"name": name, "state": "UNAVAILABLE"}


@router.post("/v2/repository/index", responses=error_responses(400, 401))
async def index(request: Request, service: Service = Depends(get_service)):
    """Every model version in the repository with its state (READY, UNAVAILABLE, LOADING, UNLOADING)."""
    return await _answer(_index(service, request))


@router.post("/v2/repository/models/{name}/load", responses=error_responses(400, 401, 403, 404, 409))
async def load_model(name: str, request: Request, service: Service = Depends(get_service)):
    """Serve the latest version on disk. If another version is served: load and warm the new one, switch, drain
    the old one (no request is refused). Needs the admin token."""
    return await _answer(_load(service, name, request))


@router.post("/v2/repository/models/{name}/unload", responses=error_responses(401, 403, 404, 409))
async def unload_model(name: str, request: Request, service: Service = Depends(get_service)):
    """Stop serving a model once its admitted requests are answered. Needs the admin token."""
    return await _answer(_unload(service, name, request))
