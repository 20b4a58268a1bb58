"""The page for people at ``/``: plain HTML and one small script (server/static/), no CDN, no build step."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page():
    """Drop or pick an image; the top classes, this request's latency, and what sparsity saves (from /stats)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/ui/app.js")
async def page_script():
    return FileResponse(STATIC / "app.js", media_type="text/javascript")
