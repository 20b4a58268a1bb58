"""What sparsity buys on this machine (calibration against the dense twin) and live end-to-end figures."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import get_service
from ..service import Service

router = APIRouter(tags=["stats"])


@router.get("/stats")
async def stats(service: Service = Depends(get_service)):
    """Model level: the sparse model against its dense twin (calibration). End to end: the requests served."""
    return {"model": service.model_card if service.model else None, "calibration": service.calibration,
            "live": service.live_stats(), "config": service.cfg.public()}
# POST /stats/calibrate is an admin call: server/auth.py adds it, with --admin-token only
