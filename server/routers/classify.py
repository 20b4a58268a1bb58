"""POST /classify: admit or refuse the request (before its body is read or decoded), read and parse the body
(event loop), decode it (thread pool; a single small image or raw pixels inline, cheaper than the hop), join the
next forward pass (batcher), answer with orjson."""
from __future__ import annotations

import asyncio
import math
import time

import numpy as np
from fastapi import APIRouter, HTTPException, Request

from ..batching import Overloaded
from ..deps import service_if_ready
from ..admission import PATH, TICKET
from ..errors import error_responses
from ..inputs import SHAPE_HEADER, cheap_to_decode, decode_body, read_body
from ..schemas import ClassifyResponse, FastJSONResponse
from ..parsing import classify_request_body
from ..hotpath import IntQuery, StrQuery, openapi_parameters
from ..service import top_k

router = APIRouter(tags=["classify"])

TOP_K = IntQuery("top_k", 3, 1, 1000, "labels per image")
SHAPE = StrQuery("shape", "raw pixels: N,C,H,W or N,H,W (or the X-Shape header)")
OPENAPI = {"requestBody": classify_request_body({
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": f"raw uint8 pixels N×C×H×W (or N×H×W) with the shape in the "
                                                f"'{SHAPE_HEADER}' header or the 'shape' query parameter"}}),
           **openapi_parameters(TOP_K, SHAPE)}


def timed_decode(*args) -> tuple[np.ndarray, float]:
    """``decode_body`` and the seconds it took (measured where it runs)."""
    t = time.perf_counter()
    images = decode_body(*args)
    return images, time.perf_counter() - t


def _busy(e: Overloaded) -> HTTPException:
    return HTTPException(503, f"server busy: {e}", headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))})


@router.post(PATH, response_model=ClassifyResponse, openapi_extra=OPENAPI,
             responses=error_responses(400, 408, 413, 415, 422, 431, 500, 503))
async def classify(request: Request):
    """Classify one or more images (PNG, JPEG, WebP, BMP, TIFF; any size and mode): raw bytes, multipart ``file``
    fields, JSON base64, or raw uint8 pixels with a shape. Images are converted to the model's channels and size
    as in training. A request that would queue longer than ``--max-queue-ms`` is answered 503 at once."""
    start = time.perf_counter()
    service = service_if_ready(request)
    top_k_ = TOP_K.parse(request.query_params)  # by hand, not by FastAPI (server/hotpath.py)
    served = service.served
    cfg, model, batcher = service.cfg, served.model, served.batcher
    ticket = request.scope.get(TICKET)  # admitted by the AdmissionGate, before the body was read
    if ticket is None:  # the app is mounted without its gate (e.g. inside another app): admit here
        try:
            ticket = batcher.admit(1)
        except Overloaded as e:
            service.metrics.rejected.inc()
            raise _busy(e)

    async def images_of() -> np.ndarray:
        body = await read_body(request, model.input_shape, cfg.max_images_per_request)
        ticket.resize(body.images_hint)
        service.observe_body(body)
        service.metrics.queue_depth.set(batcher.pending_images)
        args = (body, model.input_shape, cfg.max_pixels, cfg.max_images_per_request)
        if cheap_to_decode(body):
            images, seconds = timed_decode(*args)
        else:
            images, seconds = await asyncio.get_running_loop().run_in_executor(service.decoder, timed_decode, *args)
        batcher.observe_decode(len(images), seconds)  # the work itself, not the wait for a decode thread
        return images

    result, timing = await service.serve_admitted(batcher, ticket, start, images_of, _busy)
    return FastJSONResponse({"model": service.card(served), "predictions": top_k(result.probs, model.classes, top_k_),
                             **timing})
