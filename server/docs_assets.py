"""/docs with Swagger UI served by this server (from the swagger-ui-py package), not from a CDN.

FastAPI's default /docs page loads its JavaScript and CSS from a CDN, so it is blank on a machine
without internet access. Create the app with ``docs_url=None, redoc_url=None`` and call
``add_offline_docs``.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def swagger_ui_dir() -> Path:
    """The swagger-ui dist files that the swagger-ui-py wheel ships."""
    return Path(str(files("swagger_ui") / "static"))


def add_offline_docs(app: FastAPI, path: str = "/docs") -> None:
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")

    @app.get(path, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")
