"""What sparsity buys on this machine (calibration against the dense twin) and live end-to-end figures."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from ..deps import get_service, loaded_service
from ..service import Service

router = APIRouter(tags=["stats"])


@router.get("/stats")
async def stats(service: Service = Depends(get_service)):
    """Model level: the sparse model against its dense twin (calibration). End to end: the requests served."""
    return {"model": service.model_card if service.model else None, "calibration": service.calibration,
            "live": service.live_stats(), "config": service.cfg.public()}


@router.post("/stats/calibrate")
async def calibrate(service: Service = Depends(loaded_service)):
    """Measure sparse vs dense again now (takes a few seconds)."""
    return await asyncio.to_thread(service.run_calibration)
