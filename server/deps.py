"""FastAPI dependencies: the routers get the app's ``Service`` through ``Depends(get_service)``.

They are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per request."""
from __future__ import annotations

from fastapi import HTTPException, Request

from .service import Service


async def get_service(request: Request) -> Service:
    return request.app.state.service


def service_if_ready(request: Request) -> Service:
    """The service once its model is loaded; 503 + Retry-After before that."""
    service: Service = request.app.state.service
    if not service.ready:
        raise HTTPException(503, "model is not loaded yet", headers={"Retry-After": "1"})
    return service


async def loaded_service(request: Request) -> Service:
    """``service_if_ready`` as a dependency."""
    return service_if_ready(request)
