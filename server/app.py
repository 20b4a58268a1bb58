"""The FastAPI app: ``create_app(ServeConfig(...))``, usable by uvicorn, tests and any ASGI server.

Thin on purpose: endpoints live in ``server/routers`` (one router per concern), shared state in ``Service``
(``server/service.py``, handed to the routers by ``server/deps.py``), settings in ``ServeConfig``
(``server/settings.py``). Middleware and exception handlers are added in ``_middleware`` only, so further
layers (auth, error model, timeouts) go in one place.
"""
from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .admission import PATH, AdmissionGate, EarlyAdmission
from .auth import add_admin_routes, api_key_dependencies
from .errors import error_responses
from .hardening import harden
from .hotpath import HotRoute, hot_route
from .limits import BodyLimitMiddleware
from .metrics import RequestCounter
from .routers import ROUTERS, classify, v2
from .schemas import FastJSONResponse
from .service import Service
from .settings import ServeConfig

__all__ = ["ServeConfig", "create_app", "app_from_env"]

log = logging.getLogger("uvicorn.error")


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        failed = await service.repository.load_all()
        for problem in failed:
            log.error("g2g-serve: not served: %s", problem)
        if service.model is None:
            default = service.cfg.default_model
            why = failed or [f"the default model {default!r} is not in the repository" if default
                             else "the repository holds no model"]
            raise RuntimeError("no model to serve: " + "; ".join(why))
        gc.collect()
        gc.freeze()  # the start-up heap (libraries, models) is never collected: no full collection walks it again
        service.ready = True
        calibrate = service.cfg.calibrate and service.claims_startup_calibration()
        calibration = asyncio.create_task(asyncio.to_thread(service.run_calibration)) if calibrate else None
        yield
        service.ready = False
        app.state.early_admission.flush()  # protocol refusals not yet in the counters
        await service.repository.close()  # let in-flight requests finish
        if calibration is not None:
            await calibration
        service.close()
    return lifespan


def _middleware(app: FastAPI, service: Service) -> None:
    """Every middleware and exception handler of the app (outermost last)."""
    known_paths = {r.path for routes in (app.routes, *(r.routes for r in ROUTERS)) for r in routes
                   if hasattr(r, "path")}  # other paths are counted as "other"
    route = hot_route(classify.router, "POST", PATH)
    if route is not None and not service.cfg.api_key:  # straight from the middleware to the endpoint (hotpath.py)
        app.add_middleware(HotRoute, fastapi_app=app, route=route)
    app.add_middleware(AdmissionGate, service=service)
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.cfg.max_body_bytes)
    harden(app, service.cfg)  # JSON errors, deadlines, CORS, offline /docs: inside the counter, which counts them
    app.add_middleware(RequestCounter, metrics=service.metrics, known_paths=known_paths)


def create_app(cfg: ServeConfig) -> FastAPI:
    service = Service(cfg)
    app = FastAPI(title="g2gserve", version="1", lifespan=_lifespan(service), default_response_class=FastJSONResponse,
                  docs_url=None, redoc_url=None,  # /docs with local assets: server/docs_assets.py
                  description="Image classification with a sparse G2GNet, and what its sparsity saves on this machine.")
    app.state.service = service
    app.state.early_admission = EarlyAdmission(service)  # refusals decided in the HTTP protocol (server/protocol.py)
    for router in ROUTERS:
        guarded = router in (classify.router, v2.router) and cfg.api_key  # inference, whichever protocol
        app.include_router(router, dependencies=api_key_dependencies(cfg.api_key) if guarded else None,
                           responses=error_responses(401) if guarded else None)
    add_admin_routes(app, cfg.admin_token, service.run_calibration, lambda: service.ready)
    _middleware(app, service)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory server.app:app_from_env`` (several workers): settings from $G2G_SERVE_CONFIG."""
    return create_app(ServeConfig.from_env())
