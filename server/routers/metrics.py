"""Prometheus scrape endpoint (summed over workers in multiprocess mode)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..deps import get_service
from ..service import Service

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(service: Service = Depends(get_service)):
    """Prometheus text format."""
    body, content_type = service.metrics.exposition()
    return Response(body, media_type=content_type)
