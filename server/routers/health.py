"""Liveness and readiness, and the served model's manifest."""
from __future__ import annotations

import os

from fastapi import APIRouter, Depends

from ..schemas import FastJSONResponse
from ..deps import get_service, loaded_service
from ..service import Service

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz():
    """Alive (the process answers)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: Service = Depends(get_service)):
    """Ready: the model is loaded and warmed up."""
    if not service.ready:
        return FastJSONResponse({"ready": False}, status_code=503)
    return {"ready": True, "model": service.model_card, "pid": os.getpid()}  # pid: which worker answered


@router.get("/model")
async def model_manifest(service: Service = Depends(loaded_service)):
    """The export manifest: config, classes, preprocessing, per-layer formats, sizes, parity."""
    return service.model.manifest
