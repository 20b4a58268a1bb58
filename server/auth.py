"""Who may do what: an optional API key for /classify, a token for admin calls that spawn work.

Admin calls (POST /stats/calibrate loads the dense twin, times it and starts fresh processes) are
not routed at all unless an admin token is configured: 20 concurrent anonymous calibrations used
to cost ~100 CPU-seconds and 200 MiB of resident memory that never came back. With a token they
run one at a time (a second call gets 409) and hand freed memory back to the OS afterwards.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import hmac
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .errors import error_responses

API_KEY_HEADER = "X-API-Key"


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def api_key_dependencies(api_key: str | None) -> list:
    """``dependencies=`` for /classify: none without a key, else the ``X-API-Key`` header must match (401)."""
    if not api_key:
        return []
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's --api-key")

    async def check(given: str | None = Security(header)) -> None:
        if not _same(given, api_key):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header",
                                headers={"WWW-Authenticate": API_KEY_HEADER})
    return [Depends(check)]


def _admin_dependency(token: str):
    bearer = HTTPBearer(auto_error=False, description="the server's --admin-token")

    async def check(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if credentials is None or not _same(credentials.credentials, token):
            raise HTTPException(401, "admin call: send 'Authorization: Bearer <admin token>'",
                                headers={"WWW-Authenticate": "Bearer"})
    return Depends(check)


def release_memory() -> None:
    """Collect garbage and return free heap pages to the OS (glibc), so RSS goes back down."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


def add_admin_routes(app: FastAPI, token: str | None, calibrate: Callable[[], dict],
                     ready: Callable[[], bool], calibration_model: type | None = None) -> None:
    """POST /stats/calibrate behind ``token`` (not routed without one), one at a time."""
    if not token:
        return
    running = asyncio.Lock()

    @app.post("/stats/calibrate", dependencies=[_admin_dependency(token)], response_model=calibration_model,
              responses=error_responses(401, 409, 500, 503))
    async def calibrate_now() -> Any:
        """Measure sparse vs dense again now (takes a few seconds; admin token; one at a time)."""
        if not ready():
            raise HTTPException(503, "model is not loaded yet", headers={"Retry-After": "1"})
        if running.locked():
            raise HTTPException(409, "a calibration is already running; GET /stats shows its result")
        async with running:
            try:
                return await asyncio.to_thread(calibrate)
            finally:
                await asyncio.to_thread(release_memory)

